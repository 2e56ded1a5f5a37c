"""Where a training step's time goes, for the two steps whose speed targets are not met on a 2-core CPU.

    python benchmarks/step_anatomy.py gan-layers     # each DCGAN convolution, forward + backward, in 4 layouts
    python benchmarks/step_anatomy.py ppo-update     # CartPole's PPO minibatch update: eager vs torch.compile

gan-layers: the DCGAN generator's and discriminator's convolutions at batch 128 (32x32 Fashion-MNIST shapes), each
alone, forward + backward, in fp32/bf16 x contiguous/channels-last, then the step's total (the generator once, the
discriminator three times) at 1 and 2 threads. ppo-update: rl-zoo's CartPole actor-critic (64-unit tanh bodies),
one minibatch update of 256 (clipped objective, value loss, grad clipping, fused AdamW), eager, then with the loss
compiled by inductor: the first call's time (compilation) and the steady time per update.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

BATCH = 128


def per_call_us(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def gan_layers() -> None:
    # (name, layer, input shape, whether the layer's input needs a gradient: not for the first layer of each net)
    layers = [("G 128->256 1->4 px", nn.ConvTranspose2d(128, 256, 4, 1, 0, bias=False), (BATCH, 128, 1, 1), False),
              ("G 256->128 4->8", nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), (BATCH, 256, 4, 4), True),
              ("G 128->64 8->16", nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), (BATCH, 128, 8, 8), True),
              ("G 64->1 16->32", nn.ConvTranspose2d(64, 1, 4, 2, 1, bias=False), (BATCH, 64, 16, 16), True),
              ("D 1->64 32->16", nn.Conv2d(1, 64, 4, 2, 1, bias=False), (BATCH, 1, 32, 32), False),
              ("D 64->128 16->8", nn.Conv2d(64, 128, 4, 2, 1, bias=False), (BATCH, 64, 16, 16), True),
              ("D 128->256 8->4", nn.Conv2d(128, 256, 4, 2, 1, bias=False), (BATCH, 128, 8, 8), True),
              ("D 256->1 4->1", nn.Conv2d(256, 1, 4, 1, 0, bias=False), (BATCH, 256, 4, 4), True)]

    def ms(layer, shape, grad_in, bf16, channels_last):
        layer, x = copy.deepcopy(layer), torch.randn(shape)  # a copy: .to(memory_format) changes a module in place
        if channels_last:
            layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(grad_in)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = layer(x)
            y.float().sum().backward()
        return per_call_us(run, 10) / 1e3

    print(f"{'layer':22s} {'fp32':>8s} {'fp32 cl':>8s} {'bf16':>8s} {'bf16 cl':>8s}   ms forward + backward")
    for name, layer, shape, grad_in in layers:
        row = [ms(layer, shape, grad_in, bf16, cl) for bf16 in (False, True) for cl in (False, True)]
        print(f"{name:22s} " + " ".join(f"{v:8.1f}" for v in row))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        total = sum(ms(layer, shape, grad_in, True, True) * (3 if name.startswith("D") else 1)
                    for name, layer, shape, grad_in in layers)
        print(f"bf16 channels-last, {threads} thread(s): generator + 3 x discriminator = {total:.0f} ms per step")


def ppo_update() -> None:
    from nnforge.models import create_model
    from nnforge.tasks.rl.ppo import sample

    torch.set_num_threads(1)  # as nnforge trains MLP policies
    torch.manual_seed(0)
    policy = create_model("mlp_policy", obs_shape=[4], n_actions=2)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, fused=True)
    n = 256
    obs, act, old_logp = torch.randn(n, 4), torch.randint(0, 2, (n,)), torch.randn(n) - 0.7
    adv, ret = torch.randn(n), torch.randn(n)

    def loss_of(obs, act, old_logp, adv, ret):
        out, value = policy.heads(obs)
        _, logp, _ = sample(policy, out.float(), act)
        ratio = (logp - old_logp).exp()
        a = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean()
        return pg + 0.5 * 0.5 * ((value - ret) ** 2).mean()

    def update(fn):
        loss = fn(obs, act, old_logp, adv, ret)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
        opt.step()

    print(f"eager update: {per_call_us(lambda: update(loss_of), 2000, 50):.0f} us")
    compiled = torch.compile(loss_of)
    t = time.perf_counter()
    update(compiled)
    print(f"torch.compile: first update {time.perf_counter() - t:.1f} s (compilation; inductor caches it on disk)")
    print(f"compiled loss, eager optimizer: {per_call_us(lambda: update(compiled), 2000, 50):.0f} us per update")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["gan-layers", "ppo-update"])
    {"gan-layers": gan_layers, "ppo-update": ppo_update}[p.parse_args().what]()


if __name__ == "__main__":
    main()
