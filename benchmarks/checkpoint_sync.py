"""Issue 7 benchmark: block-level checkpoint sync vs saving the whole model, on the embedded model.

The embedded model's 1.1 GB fp32 safetensors file is copied to a temporary directory (the user's
cache is never written). Live weights are a private copy of the model's tensors; 1% and then 0.01%
of the file's 4 KiB data blocks, chosen uniformly (so spread over the tensors in proportion to
their size), get one element changed, and the copy is synced. In the same run, the whole model is
written with `safetensors.torch.save_file`, plain (what the target compares against) and followed
by an fsync (the durable equivalent: sync always fsyncs its journal and the file). Rounds are
interleaved so both see the same shared, noisy machine; best of N is compared, medians shown.
Target: sync at least 10x faster than the full save at 1% changed.
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks._common import load_embedded, machine_line  # noqa: E402
from amygdala.training.checkpoint.sync import BLOCK_SIZE, sync_checkpoint  # noqa: E402
from amygdala.training.checkpoint.format import read_layout  # noqa: E402

TARGET = 10.0
ST = "model.safetensors"


def perturb(live: dict[str, torch.Tensor], layout, fraction: float, rng: np.random.Generator) -> int:
    """Flip the lowest bit of one element in `fraction` of the data blocks; returns the number of blocks."""
    first = layout.data_start // BLOCK_SIZE
    last = (layout.size - 1) // BLOCK_SIZE
    n = max(1, round(fraction * (last - first + 1)))
    blocks = rng.choice(np.arange(first, last + 1), n, replace=False)
    entries = layout.by_offset()
    starts = [e.start for e in entries]
    for b in blocks:
        off = min(max(int(b) * BLOCK_SIZE + BLOCK_SIZE // 2, layout.data_start), layout.size - 1)
        e = entries[bisect.bisect_right(starts, off) - 1]
        off = min(max(off, e.start), e.end - 4)
        flat = live[e.name].view(-1).view(torch.int32)
        flat[(off - e.start) // 4] ^= 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (best and median reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lm = load_embedded()
    print(machine_line())
    src = lm.path / ST
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="amygdala-sync-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        shutil.copyfile(src, model_dir / ST)
        layout = read_layout(model_dir / ST)
        if any(e.dtype != "F32" for e in layout.tensors.values()):
            raise SystemExit("expected the fp32 embedded checkpoint")
        state = lm.model.state_dict()
        live = {name: state[name].detach().clone() for name in layout.tensors}  # private memory, file dtype
        del state, lm  # the served model maps the user's cache file; only the copy is synced
        size = layout.size
        print(f"file: {src} ({size / 1e9:.2f} GB, {len(layout.tensors)} tensors, "
              f"{(size + BLOCK_SIZE - 1) // BLOCK_SIZE} blocks of {BLOCK_SIZE} B), copied to {model_dir}")

        report = sync_checkpoint(model_dir, live)  # warm-up: maps the file, faults pages in
        assert report.blocks_written == 0, "copy differs from the model?"
        scenarios = (("0% (compare only)", 0.0), ("1% of blocks", 0.01), ("0.01% of blocks", 0.0001))
        sync_times: dict[str, list[float]] = {label: [] for label, _ in scenarios}
        last: dict[str, object] = {}
        full = model_dir / "full.safetensors"
        save_times, durable_times = [], []
        # Interleaved rounds, so that sync and the full save see the same (shared, noisy) machine.
        for _ in range(args.repeats):
            for label, fraction in scenarios:
                if fraction:
                    perturb(live, layout, fraction, rng)
                t0 = time.perf_counter()
                last[label] = sync_checkpoint(model_dir, live)
                sync_times[label].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            save_file(live, full)
            save_times.append(time.perf_counter() - t0)
            fd = os.open(full, os.O_RDONLY)
            os.fsync(fd)  # also keeps the save's dirty pages from slowing the next round's syncs
            os.close(fd)
            durable_times.append(time.perf_counter() - t0)
            full.unlink()

        reloaded = load_file(model_dir / ST)
        exact = reloaded.keys() == live.keys() and all(torch.equal(reloaded[k], live[k]) for k in live)
        del reloaded

    def best_med(xs: list[float]) -> tuple[float, float]:
        return min(xs), statistics.median(xs)

    t_save, m_save = best_med(save_times)
    t_durable, m_durable = best_med(durable_times)
    print(f"\n{args.repeats} interleaved rounds, best (median); sync includes its journal and fsyncs; "
          "written = model-file bytes")
    print(f"{'changed':<19}{'tensors':>8}{'blocks':>8}{'written MB':>11}{'journal MB':>11}{'time s':>16}"
          f"{'vs save_file':>14}{'vs save+fsync':>15}")
    for label, _ in scenarios:
        r = last[label]
        t, m = best_med(sync_times[label])
        print(f"{label:<19}{r.tensors_touched:>8}{r.blocks_written:>8}{r.bytes_written / 1e6:>11.2f}"
              f"{r.journal_bytes / 1e6:>11.2f}{t:>8.3f} ({m:.3f}){t_save / t:>13.1f}x{t_durable / t:>14.1f}x")
    print(f"{'full save_file':<19}{len(live):>8}{'':>8}{size / 1e6:>11.2f}{'':>11}{t_save:>8.3f} ({m_save:.3f})")
    print(f"{'full save + fsync':<19}{len(live):>8}{'':>8}{size / 1e6:>11.2f}{'':>11}{t_durable:>8.3f} ({m_durable:.3f})")
    print(f"\nsynced file reloads equal to the live weights: {exact}")
    ratio = t_save / min(sync_times["1% of blocks"])
    ratio_med = m_save / statistics.median(sync_times["1% of blocks"])
    ok = ratio >= TARGET and exact
    print(f"target: sync >= {TARGET:.0f}x faster than save_file at 1% changed: {ratio:.1f}x best vs best "
          f"({ratio_med:.1f}x median vs median) -> {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
