"""Peak memory of a KD loss + backward at vocabulary 262,144 (Gemma 3's), float32: the naive
full-logits computation vs our chunked one (`divergences.fused_token_divergence`: hidden states and
lm_head weights in, logits made and dropped chunk by chunk, recomputed in backward).

    .venv/bin/python bench/loss_memory.py [--positions 512] [--naive-max 256]

Every measurement is a fresh subprocess: it allocates the inputs (student and teacher hidden states
[8, T, 640] and lm_head weights [262144, 640]; the student's are trainable), records its resident
memory, runs forward + backward, and reports the peak (VmHWM) minus that baseline, i.e. the memory the
loss and its backward need on top of their inputs (the student head's gradient, 0.67 GB, included).
The naive computation at 8 x 512 positions needs more than this 24 GB machine can give, so it runs at
fewer positions, and its 8 x 512 figure is extrapolated linearly (its memory is linear in positions;
the fit's residuals are printed). Results of the two computations are compared at 8 x 64 (1e-5).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

V, H, BATCH = 262_144, 640, 8


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def worker(mode: str, positions: int, check: bool) -> None:
    import torch

    from distillability.divergences import divergence_rows, fused_token_divergence

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    s_h = (torch.randn(BATCH, positions, H, generator=g) * 0.5).requires_grad_()
    t_h = torch.randn(BATCH, positions, H, generator=g) * 0.5
    s_w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    t_w = torch.randn(V, H, generator=g) * 0.05
    base = _rss_mb("VmRSS:")
    if mode == "naive":
        s_logits = s_h @ s_w.T
        t_logits = t_h @ t_w.T
        loss = divergence_rows(s_logits.reshape(-1, V), t_logits.reshape(-1, V), "fkl").mean()
    else:
        loss = fused_token_divergence(s_h, s_w, t_h, t_w, "fkl", chunk_size=256)
    loss.backward()
    peak = _rss_mb("VmHWM:")
    out = {"mode": mode, "positions": BATCH * positions, "extra_mb": peak - base, "loss": loss.item()}
    if check:
        out["grad_h"] = s_h.grad[0, :4, :4].flatten().tolist()
        out["grad_w_norm"] = s_w.grad.norm().item()
    print("RESULT " + json.dumps(out), flush=True)


def run(mode: str, positions: int, check: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--per-seq", str(positions)] + (["--check"] if check else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{mode} at {positions} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=512, help="positions per sequence (8 sequences)")
    ap.add_argument("--naive-max", type=int, default=256, help="largest per-sequence length the naive run may use")
    ap.add_argument("--worker"), ap.add_argument("--per-seq", type=int), ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.per_seq, args.check)
    a, b = run("naive", 64, check=True), run("chunked", 64, check=True)
    max_diff = max([abs(a["loss"] - b["loss"]), abs(a["grad_w_norm"] - b["grad_w_norm"]) / max(1e-12, a["grad_w_norm"])]
                   + [abs(x - y) for x, y in zip(a["grad_h"], b["grad_h"])])
    print(f"8 x 64: naive loss {a['loss']:.6f}, chunked {b['loss']:.6f}; max difference (loss, grads) {max_diff:.2e}")
    sizes = [s for s in (64, 128, 256, 512) if s <= args.naive_max]
    naive = {s: run("naive", s)["extra_mb"] for s in sizes}
    chunked = {s: run("chunked", s)["extra_mb"] for s in sorted(set(sizes) | {args.positions})}
    for s in sizes:
        print(f"8 x {s:4d} positions: naive {naive[s]:8.0f} MB  chunked {chunked[s]:6.0f} MB  ratio {chunked[s] / naive[s]:.3f}")
    # naive memory is linear in positions: least-squares line through the measured points
    xs, ys = list(naive), list(naive.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
    icept = my - slope * mx
    resid = {s: round(naive[s] - (icept + slope * s), 1) for s in xs}
    if args.positions in naive:
        naive_full, how = naive[args.positions], "measured"
    else:
        naive_full, how = icept + slope * args.positions, "extrapolated"
    ratio = chunked[args.positions] / naive_full
    print(f"8 x {args.positions} positions: naive {naive_full:.0f} MB ({how}; fit residuals {resid} MB), "
          f"chunked {chunked[args.positions]:.0f} MB (measured): ratio {ratio:.3f}")
    print(json.dumps({"vocab": V, "hidden": H, "positions": BATCH * args.positions, "naive_mb": round(naive_full),
                      "naive_how": how, "chunked_mb": round(chunked[args.positions]), "ratio": round(ratio, 4),
                      "max_abs_diff": max_diff, "naive_measured_mb": {8 * k: round(v) for k, v in naive.items()},
                      "chunked_measured_mb": {8 * k: round(v) for k, v in chunked.items()}}))


if __name__ == "__main__":
    main()
