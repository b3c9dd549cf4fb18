"""A batch-inference job's result: what was restored, reused or bad, the bad list, the zip, the score, the gallery,
the rates, and the report printed at the end (``finish``).

The rates exclude the start-up: model loads, compilation and cuDNN's first calls fall in each actor's first batch, so
the steady rate is measured from the end of the first batch (``rate_after_first_batch``), per actor and pooled.
"""
from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from restore.inputs import BAD, DONE, TODO, Plan
from restore.ray_pipeline import ACTOR_TIME_COLUMNS, SCORE_TERMS
from restore.submission import build_zip
from shards import schema

NOTES_SHOWN = 200  # per-image note lines printed at the end (the rest: counted; the gallery shows every one)


def listing(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` names and how many more: a line of a report stays one line for a million keys."""
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def bad_list_path(given: str | None, out: Path | None, png_dir: Path, source: Path) -> Path:
    """This job's list of bad inputs: ``--bad-list``, else ``OUTSTEM.bad.json`` beside the zip, else (``--no-zip``)
    ``PNG_DIR/SOURCE-HASH.bad.json``, named after the input folder (and a hash of its full path), so another job
    writing the same folder keeps its own list."""
    if given:
        return Path(given)
    if out is not None:
        return out.with_name(out.stem + ".bad.json")
    tag = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return png_dir / f"{source.name or 'input'}-{tag}.bad.json"


def rate_after_first_batch(batch_ends: Sequence[float]) -> dict | None:
    """The steady rate after the first batch (model loads and compilation excluded): the images of the batches that
    ended after the first one, over the time from its end to the last batch's end. ``batch_ends``: one time per
    restored image, the end of its batch: one actor's clock (``actor_time_split``), all actors' wall clocks pooled
    (the run's steady rate, whether they overlapped or not), or the arrivals at the driver (``steady_rate``). None
    with fewer than two batches."""
    if not batch_ends:
        return None
    first, last = min(batch_ends), max(batch_ends)
    if last <= first:
        return None
    images = sum(1 for t in batch_ends if t > first)
    return {"images": images, "span_s": round(last - first, 3), "img_s": round(images / (last - first), 3)}


def steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Restored images per second after the first batch that restored any (start-up and model load excluded), from
    (arrival time, images restored) per batch."""
    rate = rate_after_first_batch([t for t, n in arrivals for _ in range(n)])
    return rate["img_s"] if rate else None


def actor_time_split(marks: Sequence[tuple[float, float, float]]) -> dict | None:
    """What one actor did from the end of its first batch (model load, compilation and cuDNN's first calls excluded)
    to the end of its last: shares of that span in the model (``model``), in the rest of its calls (``calls_other``:
    stacking, copies, building the result) and outside its calls (``outside_calls``: Ray batching its input and
    storing its output, or the actor waiting for input because reading does not keep up), and the images it restored
    in that span and their rate (``images``, ``img_s``: the actor's steady rate, which the driver's view of arriving
    batches only approximates, as the write stage hands them back in bursts). ``marks``: one per restored image, the
    actor's (clock, model, calls) seconds at the end of the image's batch, cumulative. None with fewer than two
    batches."""
    rate = rate_after_first_batch([clock for clock, _, _ in marks])
    if rate is None:
        return None
    (clock0, model0, calls0), (clock1, model1, calls1) = min(marks), max(marks)
    span = clock1 - clock0
    model, calls = model1 - model0, calls1 - calls0
    return {"span_s": rate["span_s"], "model": round(model / span, 4), "calls_other": round((calls - model) / span, 4),
            "outside_calls": round(1.0 - calls / span, 4), "images": rate["images"], "img_s": rate["img_s"]}


def finish(args: argparse.Namespace, plan: Plan, rows: list[dict], png_dir: Path, out: Path | None,
            elapsed: float, *, redo: dict[str, list[str]], gallery_dir: Path | None) -> dict:
    """The job's result from the pipeline's rows (one per key, bad ones included): checks every planned key came
    back, writes the bad list (or removes a stale one), builds and verifies the zip, scores, writes the gallery, prints
    the report and returns the summary."""
    by_key: dict[str, dict] = {}
    for row in rows:
        if row["key"] in by_key and by_key[row["key"]]["status"] != BAD:
            continue  # a duplicate copy inside a shard: the first good one counts
        by_key[row["key"]] = row
    unseen = [k for k in plan.keys if k not in by_key]
    if unseen:
        raise RuntimeError(f"the pipeline returned no row for {len(unseen)} keys: {', '.join(unseen[:10])}")
    expected = set(plan.keys)
    bad = [by_key[k] for k in plan.keys if by_key[k]["status"] == BAD]
    bad += [r for r in rows if r["status"] == BAD and r["key"] not in expected]
    good = [k for k in plan.keys if by_key[k]["status"] != BAD]
    restored = [by_key[k] for k in good if by_key[k]["status"] == TODO]

    per_worker: dict[str, dict] = defaultdict(lambda: {"images": 0, "busy_s": 0.0, "graphs_compiled": 0,
                                                       "graphs_cached": 0})
    marks: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for r in restored:
        w = per_worker[r["worker"]]
        w["images"] += 1
        w["busy_s"] += float(r["infer_s"])
        for k in ("graphs_compiled", "graphs_cached"):  # each row holds the actor's count so far
            w[k] = max(w[k], int(r[k]))
        marks[r["worker"]].append(tuple(float(r[k]) for k in ACTOR_TIME_COLUMNS))
    for name, w in per_worker.items():
        w["after_first_batch"] = actor_time_split(marks[name])
    steady = rate_after_first_batch([float(r["actor_end_unix"]) for r in restored])
    read_redo: dict[str, list[str]] = defaultdict(list)  # finished outputs whose input (or mask) bytes changed
    for r in restored:
        if r.get("redo"):
            read_redo[r["redo"]].append(r["key"])
    all_redo = {reason: len(keys) for reason, keys in {**redo, **read_redo}.items()}
    summary: dict[str, Any] = {
        "images": len(plan.keys), "restored": len(restored), "already_done": len(good) - len(restored),
        "bad": len(bad), "seconds": round(elapsed, 3),
        "img_per_s": round(len(restored) / elapsed, 3) if elapsed > 0 else None,
        "steady": steady,
        "workers": {w: {**v, "img_per_s": round(v["images"] / v["busy_s"], 3) if v["busy_s"] else None}
                    for w, v in sorted(per_worker.items())},
        "png_dir": str(png_dir), "zip": None, "gallery": None, "redo": all_redo,
        "ignored": list(plan.ignored), "unused_masks": list(plan.unused_masks),
        "notes": [f"{k}: {by_key[k]['note']}" for k in good if by_key[k]["note"]],
    }
    if read_redo:
        print("redo " + "; ".join(f"{len(keys)}: {reason} ({listing(keys, 3)})"
                                  for reason, keys in sorted(read_redo.items(), key=lambda kv: -len(kv[1]))))

    bad_path = bad_list_path(args.bad_list, out, png_dir, plan.source)
    summary["bad_list"] = str(bad_path) if bad else None
    if bad:
        bad_rows = [{"key": r["key"], "where": r["where"], "error": r["error"]} for r in bad]
        schema.atomic_write_json(bad_path, {"count": len(bad_rows), "bad": bad_rows, "zip_holds": len(good),
                                            "expected": len(plan.keys)})
        print(f"skipped {len(bad)} bad input(s) (listed in {bad_path}):")
        for r in bad_rows:
            print(f"  {r['key']}: {r['error']}")
    else:
        bad_path.unlink(missing_ok=True)  # stale from an earlier run

    if out is not None:
        sizes = {k: (int(by_key[k]["height"]), int(by_key[k]["width"])) for k in good}
        comment = (f"restore.batch_infer: {len(good)} of {len(plan.keys)} images; {len(bad)} bad inputs left out "
                   f"(see {bad_path.name})" if bad else f"restore.batch_infer: all {len(good)} images")
        build_zip(png_dir, good, sizes, out, comment)
        summary["zip"] = str(out)
        print(f"zip: {out}: {len(good)} images, verified" + (f" (WITHOUT the {len(bad)} bad keys)" if bad else ""))

    if args.score:
        from restore.score import summarize

        scored = [{**{t: by_key[k][t] for t in SCORE_TERMS}, "degenerate": by_key[k]["degenerate"]} for k in good]
        result = summarize(scored)
        summary["score"] = result
        print(f"score {result['score']:.4f}  ssim {result['ssim']:.4f}  masked_ssim {result['masked_ssim']:.4f}  "
              f"hist_sim {result['hist_sim']:.4f}  (n={result['n']}, degenerate={result['n_degenerate']})")

    if gallery_dir is not None:
        from restore.gallery import PER_PAGE, write_pages

        entries = [{**{c: by_key[k][c] for c in ("key", "height", "width", "mask_source", "hole_frac", "note")},
                    "reused": by_key[k]["status"] == DONE} for k in good]
        lines = [f"{len(plan.keys)} images from {plan.source}: {len(restored)} restored, "
                 f"{len(good) - len(restored)} reused, {len(bad)} not restored",
                 f"restorations in {png_dir.resolve()}"]
        lines += [f"redone: {n} {reason}" for reason, n in all_redo.items()]
        if plan.ignored:
            lines.append(f"ignored {len(plan.ignored)} non-image files: {listing(plan.ignored, 20)}")
        index = write_pages(gallery_dir, entries, png_dir=png_dir, title=f"restore: {plan.source.name or plan.source}",
                            bad=[{"key": r["key"], "where": r["where"], "error": r["error"]} for r in bad],
                            summary_lines=lines)
        summary["gallery"] = str(index)
        print(f"gallery: {index} ({len(entries)} images, {-(-len(entries) // PER_PAGE) or 1} pages)")

    for note in summary["notes"][:NOTES_SHOWN]:
        print(f"note: {note}")
    if len(summary["notes"]) > NOTES_SHOWN:
        print(f"note: ... and {len(summary['notes']) - NOTES_SHOWN} more notes (--gallery shows every image's)")
    print(f"done: {summary['restored']} restored, {summary['already_done']} already done, {summary['bad']} bad"
          + (f", {sum(all_redo.values())} redone" if all_redo else "")
          + (f", {len(plan.ignored)} non-image files ignored" if plan.ignored else "") + ", "
          f"{elapsed:.1f}s, {summary['img_per_s'] or 0:.2f} img/s end to end"
          + (f"; steady {steady['img_s']:.2f} img/s ({steady['images']} images after the first batch, "
             f"{steady['span_s']:.2f} s)" if steady else ""))
    for name, w in summary["workers"].items():
        print(f"  worker {name}: {w['images']} images, {w['busy_s']:.2f}s in the model, "
              f"{w['img_per_s'] or 0:.2f} img/s"
              + (f"; graphs {w['graphs_compiled']} compiled, {w['graphs_cached']} from the compile cache"
                 if args.compile != "off" else ""))
        split = w["after_first_batch"]
        if split:
            print(f"    after its first batch ({split['images']} images in {split['span_s']:.2f} s, "
                  f"{split['img_s']:.2f} img/s): in the model {split['model']:.0%}, in the rest "
                  f"of its calls {split['calls_other']:.0%}, outside its calls {split['outside_calls']:.0%} "
                  f"(Ray's batching and hand-off, or waiting for input)")
    return summary
