"""pipeline.train.optim: Muon takes the blocks' matrices, its Newton–Schulz orthogonalises, each half equals torch's."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.gpt import GPT, config_from_preset
from pipeline.train.optim import MuonWithAdamW, muon_groups, newton_schulz


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(tied):
    model = GPT(config_from_preset("cpu-tiny", tie_weights=tied))
    groups = muon_groups(model, 0.1)
    muon = {id(p) for g in groups if g["muon"] for p in g["params"]}
    adamw = [p for g in groups if not g["muon"] for p in g["params"]]
    every = {id(p) for p in model.parameters()}
    assert not muon & {id(p) for p in adamw} and muon | {id(p) for p in adamw} == every
    assert len(adamw) == len({id(p) for p in adamw}), "a tied weight is in one group once"
    assert {id(model.tok_emb.weight), id(model.out_head.weight)} <= {id(p) for p in adamw}
    named = dict(model.named_parameters())
    assert muon == {id(p) for n, p in named.items() if n.startswith("blocks.") and p.dim() == 2}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_pushes_singular_values_towards_one(dtype):
    g = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 96)
    for matrix in (g, g.T):
        x = newton_schulz(matrix, 5, dtype)
        singular = torch.linalg.svdvals(x.float())
        assert x.shape == matrix.shape and x.dtype == dtype
        assert singular.min() > 0.5 and singular.max() < 1.3  # the quintic's band around 1, not exactly 1


def _tiny_with_grads(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_from_preset("cpu-tiny", tie_weights=False))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    logits, _ = model(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    return model


def test_its_adamw_half_is_torch_adamw():
    ours, theirs = _tiny_with_grads(0), _tiny_with_grads(0)
    groups = [
        {"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1} for m in (ours, theirs)
    ]
    rest = [[p for p in m.parameters() if p.dim() < 2] for m in (ours, theirs)]
    mine = MuonWithAdamW([{**groups[0], "muon": False}, {"params": rest[0], "weight_decay": 0.0}], lr=1e-2)
    reference = torch.optim.AdamW(
        [groups[1], {"params": rest[1], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), foreach=False
    )
    for _ in range(4):
        mine.step()
        reference.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_its_muon_half_in_bf16_is_torch_muon():
    ours, theirs = _tiny_with_grads(1), _tiny_with_grads(1)
    matrices = [
        [p for n, p in m.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
        for m in (ours, theirs)
    ]
    mine = MuonWithAdamW(
        [{"params": matrices[0], "weight_decay": 0.1, "muon": True}], lr=1e-2, ns_dtype=torch.bfloat16
    )
    reference = torch.optim.Muon(matrices[1], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    before = [p.detach().clone() for p in matrices[0]]
    for _ in range(3):
        mine.step()
        reference.step()
    for start, a, b in zip(before, *matrices, strict=True):
        assert not torch.equal(a, start)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same iterations in the same dtype
