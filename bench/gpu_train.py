"""Training throughput and MFU on a CUDA GPU at the GPU profile's shape (params-gpu.yaml: gpt2-124m, context
1024, bf16 autocast, torch.compile), against the bf16 matmul rate measured in the same run.

    python -m bench.gpu_train                      # defaults: gpt2-124m, context 1024, batch 16
    python -m bench.gpu_train --batch 32 --no-compile
    python -m bench.gpu_train --batch 32 --model-only   # compile the model alone, not the loss

The step is the training loop's own arithmetic (pipeline.train.loop's optimizer groups and fused AdamW, runtime's
autocast, the model's forward, gradient clipping) on random tokens, without the loop's logging and checkpoints,
so it runs where DVC and dvclive are not installed (a bare GPU machine).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.common.config import TrainParams
from pipeline.model import perf
from pipeline.model.gpt import GPT, config_from_preset, flops_per_token
from pipeline.model.runtime import autocast
from pipeline.train.loop import make_optimizer
from pipeline.train.losses import lm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 128")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--model-only",
        action="store_true",
        help="compile the model alone, the loss eager (by default forward + loss are one graph, as the loop's)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.gpu_train needs a CUDA device (CPU figures: python -m bench.train)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = config_from_preset(args.preset, context_length=args.context, vocab_size=args.vocab, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    optimizer = make_optimizer(model, TrainParams(lr=6e-4), device)

    def forward_loss(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = module(ids[:, :-1])
        return lm_loss(logits, ids[:, 1:])

    if args.no_compile:
        loss_fn = forward_loss
    elif args.model_only:
        compiled = torch.compile(model)

        def loss_fn(_: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return forward_loss(compiled, ids)
    else:
        loss_fn = torch.compile(forward_loss)
    n_params = model.num_params()
    peak = perf.matmul_flops("cuda", dtype)

    def step() -> None:
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context + 1), device=device)
        with autocast(device, dtype):
            loss = loss_fn(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tok_s = args.steps * args.batch * args.context / seconds
    mfu = perf.mfu(flops_per_token(cfg, n_params, args.context), tok_s, peak)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "preset": args.preset,
                "params_m": round(n_params / 1e6, 1),
                "context": args.context,
                "batch": args.batch,
                "compiled": "none" if args.no_compile else "model" if args.model_only else "model+loss",
                "dtype": "bf16",
                "warmup_s": round(warmup_s, 1),
                "step_ms": round(1000 * seconds / args.steps, 1),
                "tokens_per_s": round(tok_s),
                "bf16_matmul_tflops": round(peak / 1e12, 1),
                "mfu": round(mfu, 3),
                "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
