"""RSO's two losses side by side: the float32 mean against the official float64 sum.

Whole cycles of the application's search (``python -m optax_neuron.mnist --optimizer rso
--model rso-paper --rso-loss {mean,sum64}``, its :class:`optax_neuron.mnist.rso.RSOSearch`)
on real MNIST, the official recipe, a fresh minibatch per chunk of weights (or per
weight with ``--fresh-batch weight``). Both searches start from the same weights and
run interleaved in one process (mean, sum64, sum64, mean, ...); compilation is
excluded (one warm-up call of each step); each figure is a whole cycle, every weight.
The float64 sum costs only where the loss is computed: the logits cast to float64,
their log-softmax and the sum, and the search's scalar comparisons.

    python benchmarks/bench_rso_loss.py                 # batch 256, one cycle each
    python benchmarks/bench_rso_loss.py --batch 1000 --repeats 2
    python benchmarks/bench_rso_loss.py --quick         # smoke run: 2 channels, batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from common import format_table, machine_line

LOSSES = ("mean", "sum64")


class Cycles:
    """Whole cycles of one :class:`~optax_neuron.mnist.rso.RSOSearch` (compiled at start)."""

    def __init__(self, x, y, *, loss, batch, channels, fresh_batch):
        from flax import nnx

        from optax_neuron.mnist.models import make_model
        from optax_neuron.mnist.rso import RSOSearch

        model = make_model("rso-paper", nnx.Rngs(0), channels=channels)
        model.train()
        self.x, self.y, self.done, self.times = x, y, 0, []
        self.search = RSOSearch(model, x, y, batch=batch, cycles=50, fresh_batch=fresh_batch,
                                loss=loss)  # fmt: skip
        self.params, self.state = self.search.params, self.search.state
        perm = jnp.arange(x.shape[0])
        jax.block_until_ready(self.search._step(self.params, self.state, x, y, perm, 0))
        # the cycle's shuffle is drawn eagerly: compile its operations here too
        jax.block_until_ready(jax.random.permutation(jax.random.PRNGKey(0), x.shape[0]))

    def cycle(self) -> None:
        t = time.perf_counter()
        self.params, self.state = self.search.cycle(self.params, self.state, self.done,
                                                    self.x, self.y)  # fmt: skip
        jax.block_until_ready(self.params)
        self.times.append(time.perf_counter() - t)
        self.done += 1

    @property
    def accepted(self) -> float:
        """Accepted proposals per visited weight, over the cycles run."""
        count = sum(int(v) for v in self.state.rso_accepted.values())
        return count / (self.search.total * max(self.done, 1))


def main(argv=None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 channels, batch 32")
    ap.add_argument("--batch", type=int, default=256, help="minibatch (default 256)")
    ap.add_argument("--fresh-batch", default="chunk", choices=("chunk", "weight"))
    ap.add_argument("--repeats", type=int, default=1, help="interleaved cycles of each loss")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        ap.error("--repeats and --batch must be >= 1")
    from optax_neuron.mnist.data import load_mnist

    channels, limit, batch = (2, 2000, 32) if args.quick else (16, None, args.batch)
    data = load_mnist()
    x, y = jnp.asarray(data.train_images[:limit]), jnp.asarray(data.train_labels[:limit])
    runs = {
        loss: Cycles(x, y, loss=loss, batch=batch, channels=channels,
                     fresh_batch=args.fresh_batch)
        for loss in LOSSES
    }  # fmt: skip
    for r in range(args.repeats):  # rounds alternate which loss goes first
        for loss in LOSSES if r % 2 == 0 else LOSSES[::-1]:
            runs[loss].cycle()
    base = statistics.median(runs["mean"].times)
    results, rows = {}, []
    for loss, run in runs.items():
        t = statistics.median(run.times)
        results[loss] = {"cycle_s": t, "ratio": t / base, "accepted": run.accepted}
        rows.append([loss, batch, args.fresh_batch, f"{t:.1f}", f"{t / base:.3f}",
                     f"{run.accepted:.3f}"])  # fmt: skip
    print(f"## RSO loss: float32 mean vs float64 sum, rso-paper ({channels} channels), "
          f"{args.repeats} cycle(s) each, median")  # fmt: skip
    print(machine_line())
    header = ["loss", "batch", "fresh batch", "cycle s", "/ mean", "accepted per weight"]
    print(format_table(header, rows))
    return results


if __name__ == "__main__":
    main()
