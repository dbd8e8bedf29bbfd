"""Light-PEFT's PEFT side and its two-stage recipe (spec learn.md §8.1): the importance scores against their
formulas, quantile selection, the pruned LoRA against the masked original (and against PEFT reading the
pruned adapter on the pruned base), and the recipe end to end on a tiny BERT classifier."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import shiftkit as sk
from shiftkit.compression.light_peft import LoRAImportance, prune_lora, select_lora
from shiftkit.compression.prune import attach_masks_, find_layers, prune_
from shiftkit.errors import ShiftkitError
from shiftkit.recipes.learn import TrainConfig, train
from shiftkit.recipes.light_peft import LightPEFTSettings, light_peft


class _Classifier(nn.Module):
    """A tiny BERT encoder with a linear head on the first token (what ``train`` wants: logits)."""

    def __init__(self, seed: int = 0) -> None:
        from transformers import BertConfig, BertModel

        super().__init__()
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=36,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(24, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, 0])


LORA = sk.LoRAConfig(
    r=4,
    lora_alpha=8,
    target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    exclude_modules=["head"],
    init_lora_weights=False,
)


def _ids(n: int = 3, t: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, -2:] = 0
    return ids, mask


def test_module_score_is_the_branch_to_base_norm_ratio_over_real_tokens() -> None:
    model = _Classifier()
    sk.attach_(model, LORA)
    imp = LoRAImportance(model)
    ids, mask = _ids()
    imp.token_mask = mask
    fqn = "encoder.encoder.layer.0.attention.self.query"
    wrapper = model.get_submodule(fqn)
    seen: list[Tensor] = []
    handle = wrapper.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    model.train()
    model(ids, mask).sum().backward()
    imp.step()
    handle.remove()
    x = seen[0]
    base = x @ wrapper.base.weight.T + wrapper.base.bias
    branch = wrapper.scaling * (x @ wrapper.lora_A.T) @ wrapper.lora_B.T
    ratio = branch.norm(dim=-1) / base.norm(dim=-1)
    expected = ratio[mask.bool()].mean()
    assert imp.module_scores()[fqn] == pytest.approx(float(expected), rel=1e-5)
    # the Taylor rank score, from the gradients autograd left on the factors
    a, b = wrapper.lora_A, wrapper.lora_B
    want = (a * a.grad).mean(1).abs() + (b * b.grad).mean(0).abs()
    torch.testing.assert_close(imp.rank_scores()[fqn], want.detach())


def test_scores_average_the_second_half_and_zero_b_scores_zero() -> None:
    model = _Classifier()
    sk.attach_(model, sk.LoRAConfig(r=3, target_modules=["query"]))  # B = 0 at init
    imp = LoRAImportance(model)
    ids, mask = _ids()
    model.train()
    model(ids, mask).sum().backward()
    imp.step()
    assert all(float(v.abs().sum()) == 0.0 for v in imp.rank_scores().values())  # spec §8.1 sanity check
    fqn = "encoder.encoder.layer.0.attention.self.query"
    imp._ratio[fqn] = [torch.tensor(v) for v in (100.0, 50.0, 1.0, 3.0)]  # four recorded steps
    assert imp.module_scores()[fqn] == 2.0
    imp.remove()
    with pytest.raises(ShiftkitError, match="LoRA attached"):
        LoRAImportance(_Classifier())


def test_selection_counts_quantiles_and_keeps_something() -> None:
    mod = {f"m{i}": float(i) for i in range(8)}
    rank = {f"m{i}": torch.tensor([0.0, 1.0, 2.0, 3.0]) + i for i in range(8)}
    modules, ranks = select_lora((mod, rank), module_ratio=0.5, rank_ratio=0.5)
    kept = ("m4", "m5", "m6", "m7")  # above the median of 0..7 (3.5)
    thr = torch.quantile(torch.cat([rank[m] for m in kept]), 0.5)  # 7.0
    assert thr == 7.0
    assert modules == ["m0", "m1", "m2", "m3", "m4"]  # m4's ranks 4..7 are all at or below 7
    assert ranks == {"m5": [0, 1, 2], "m6": [0, 1], "m7": [0]}
    zero = {m: torch.zeros(4) for m in mod}
    modules, ranks = select_lora(({m: 0.0 for m in mod}, zero), module_ratio=0.5, rank_ratio=0.5)
    assert len(modules) == 7 and sum(4 - len(v) for v in ranks.values()) == 1
    with pytest.raises(ShiftkitError, match="module_ratio"):
        select_lora((mod, rank), module_ratio=1.0)


def _masked_reference(
    model: nn.Module, heads: dict[str, list[int]], neurons: dict[str, list[int]]
) -> nn.Module:
    masks = attach_masks_(model)
    with torch.no_grad():
        for layer, m_att, m_ffn in masks:
            m_att[heads.get(layer.prefix, [])] = 0.0
            m_ffn[neurons.get(layer.prefix, [])] = 0.0
    return model


@torch.no_grad()
def test_pruned_lora_on_pruned_base_equals_masked_original() -> None:
    model = _Classifier().eval()
    sk.attach_(model, LORA)
    shift = sk.extract(model)
    layers = find_layers(model)
    heads = {"encoder.encoder.layer.0": [1], "encoder.encoder.layer.1": [0, 3]}
    neurons = {"encoder.encoder.layer.0": [2, 5, 30], "encoder.encoder.layer.1": [0]}
    gone = ["encoder.encoder.layer.1.attention.self.key"]
    ranks = {
        "encoder.encoder.layer.0.attention.self.value": [0, 2],
        "encoder.encoder.layer.1.output.dense": [3],
    }
    # reference: the original LoRA with those ranks and modules zeroed, under masks that zero the units
    ref_shift = copy.deepcopy(shift)
    ref_shift.tensors[f"{gone[0]}.lora_B"].zero_()
    for fqn, ks in ranks.items():
        ref_shift.tensors[f"{fqn}.lora_B"][:, ks] = 0.0
    ids, mask = _ids()
    ref = _masked_reference(sk.attach_(_Classifier().eval(), ref_shift), heads, neurons)
    expected = ref(ids, mask)

    small = prune_lora(shift, modules=gone, ranks=ranks, layers=layers, heads=heads, neurons=neurons)
    base = prune_(_Classifier().eval(), heads, neurons)
    sk.attach_(base, small)
    torch.testing.assert_close(base(ids, mask), expected, atol=1e-5, rtol=1e-5)
    cfg = small.config
    assert isinstance(cfg, sk.LoRAConfig)
    assert cfg.rank_of("encoder.encoder.layer.0.attention.self.value") == 2
    assert cfg.rank_of("encoder.encoder.layer.1.output.dense") == 3
    assert gone[0] not in small.base and f"{gone[0]}.lora_A" not in small.tensors
    for fqn in ranks:  # each module keeps its scaling α/r = 2
        assert cfg.scaling_of(fqn) == pytest.approx(LORA.scaling)
    q = small.tensors["encoder.encoder.layer.1.attention.self.query.lora_B"]
    assert q.shape == (12, 4)  # two of four 6-wide heads gone


def test_pruned_adapter_reads_the_same_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _Classifier().eval()
    sk.attach_(model, LORA)
    shift = sk.extract(model)
    heads, neurons = {"encoder.encoder.layer.0": [2]}, {"encoder.encoder.layer.1": [4, 7]}
    ranks = {
        "encoder.encoder.layer.0.attention.self.query": [1],
        "encoder.encoder.layer.1.intermediate.dense": [0, 1],
    }
    small = prune_lora(shift, ranks=ranks, layers=find_layers(model), heads=heads, neurons=neurons)
    ours = prune_(_Classifier().eval(), heads, neurons)
    sk.export_peft(small, tmp_path / "a", model=ours)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(ours), str(tmp_path / "a")).eval()
    sk.attach_(ours, small)
    ids, mask = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids, mask), ours(ids, mask), atol=1e-5, rtol=1e-5)


def test_prune_lora_refusals() -> None:
    model = _Classifier()
    sk.attach_(model, LORA)
    shift = sk.extract(model)
    with pytest.raises(ShiftkitError, match="does not adapt"):
        prune_lora(shift, modules=["nope"])
    with pytest.raises(ShiftkitError, match="out of range"):
        prune_lora(shift, ranks={"encoder.encoder.layer.0.attention.self.query": [4]})
    with pytest.raises(ShiftkitError, match="layers="):
        prune_lora(shift, heads={"encoder.encoder.layer.0": [1]})
    with pytest.raises(ShiftkitError, match="every LoRA module"):
        prune_lora(shift, modules=[m[: -len(".lora_A")] for m in shift.tensors if m.endswith(".lora_A")])


def _data(n: int = 128) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, 6), generator=g)
    labels = (ids[:, 1] < 20).long()  # learnable from one token
    return ids, labels


class _Dict(torch.utils.data.Dataset[dict[str, Tensor]]):
    def __init__(self, ids: Tensor, labels: Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def test_recipe_estimates_prunes_and_the_small_model_trains() -> None:
    ids, labels = _data()
    batches = torch.utils.data.DataLoader(_Dict(ids, labels), batch_size=16, shuffle=True)
    model = _Classifier()
    lora = LORA.replace(modules_to_save=("head",), init_lora_weights=True)
    settings = LightPEFTSettings(estimate_steps=8)
    res = light_peft(model, lora, batches, settings, TrainConfig(lr=3e-3), progress=False)
    assert res.estimate.steps == 8
    assert all(len(v) == 2 for v in res.heads.values()) and len(res.heads) == 2  # ⌈4/3⌉ = 2 per layer
    assert res.base_params[1] < res.base_params[0] and res.shift_params[1] < res.shift_params[0]
    n_mod = sum(1 for k in res.shift.tensors if k.endswith(".lora_A"))
    assert n_mod == 12 - len(res.modules) and len(res.modules) >= 8  # ρ_mod = 0.75 of 12 modules
    assert res.model is model and all(p.requires_grad for p in sk.shift_parameters(model))
    stage2 = train(
        model, sk.shift_parameters(model), batches, None, TrainConfig(epochs=8, lr=3e-2, warmup_ratio=0)
    )
    first, last = stage2.losses[: len(batches)], stage2.losses[-len(batches) :]
    assert sum(last) < 0.85 * sum(first)  # the small model learns (0.78 → 0.51 in a run)
    with pytest.raises(ShiftkitError, match="plain model"):
        light_peft(model, lora, batches, settings)
    with pytest.raises(ShiftkitError, match="estimate_steps"):
        LightPEFTSettings(estimate_steps=1)


def test_estimation_runs_its_steps_over_epochs_and_refuses_gqa_heads_up_front() -> None:
    ids, labels = _data(32)
    batches = torch.utils.data.DataLoader(_Dict(ids, labels), batch_size=16)  # 2 batches per epoch
    res = light_peft(_Classifier(), LORA, batches, LightPEFTSettings(estimate_steps=5), progress=False)
    assert res.estimate.steps == 5  # 3 epochs of 2 batches, stopped at 5
    from tiny_models import make

    llama, _ = make("tiny_llama")
    assert llama.hf.config.num_key_value_heads < llama.hf.config.num_attention_heads  # grouped-query
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ShiftkitError, match="head_ratio=0"):
        light_peft(
            llama, sk.LoRAConfig(target_modules=["q_proj"]), batches, LightPEFTSettings(estimate_steps=2)
        )
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())  # untouched
