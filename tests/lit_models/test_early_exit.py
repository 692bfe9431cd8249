"""Early exit through the model's own head (lit_models/early_exit.py, lit_models/nn/exit_runner.py): the layer loop
against the model, disabled early exit against ``generate`` (tiny Llama and SmolLM2), the oracle on a constructed
case, KV-cache handling of skipped layers, threshold monotonicity, frozen-backbone gate training, bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from lit_models.early_exit import EarlyExitLM
from lit_models.hf import load_causal_lm
from lit_models.nn.exit_gates import ExitGates, first_exit, oracle_exit
from lit_models.nn.exit_runner import ExitPolicy, LayerwiseRunner, early_exit_generate

TINY = {"num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "initializer_range": 0.3}  # 0.3: varied greedy outputs
KV_MODES = ("propagate", "kv_copy", "lazy")


class ByteTokenizer:
    """A 256-id stand-in for the linked tokenizer (id i is the character chr(i)), so that tiny models keep a 256-row
    head instead of SmolLM2's 49,152."""

    eos_token_id = pad_token_id = 2

    def __len__(self) -> int:
        return 256

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]

    def batch_decode(self, seqs: list[list[int]]) -> list[str]:
        return ["".join(map(chr, s)) for s in seqs]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def tiny_early_exit(**kwargs: object) -> EarlyExitLM:
    overrides = {**TINY, **kwargs.pop("overrides", {})}  # type: ignore[dict-item]
    return EarlyExitLM(model="llama-tiny", model_config_overrides=overrides, tokenizer=ByteTokenizer(), **kwargs)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Tiny models gain nothing from a second thread, and a shared machine makes it much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {attn: load_causal_lm("llama-tiny", config_overrides=TINY, attn_implementation=attn)
            for attn in ("eager", "sdpa")}


@pytest.fixture(scope="module")
def tiny_lm() -> EarlyExitLM:
    torch.manual_seed(0)
    return tiny_early_exit(mode="gate", gate_threshold=0.5)


def _prompt(seed: int = 0, length: int = 9, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


class ForcedExit(ExitPolicy):
    """Exit at exit index ``k`` on the steps listed in ``steps`` (1-based decoding steps), full depth otherwise."""

    def __init__(self, runner: LayerwiseRunner, k: int, steps: set[int]) -> None:
        super().__init__(runner, "confidence", 0.5)
        self.k, self.steps, self.step = k, steps, 0

    def start_token(self, h0: torch.Tensor) -> None:
        self.step += 1

    def should_exit(self, k: int, h: torch.Tensor, h_prev: torch.Tensor) -> bool:
        return self.step in self.steps and k == self.k


# ----------------------------------------------------------------------------------------------------- layer loop
def test_runner_exits_equal_model_logits_and_block_outputs(tiny_models: dict) -> None:
    model = tiny_models["sdpa"]
    runner = LayerwiseRunner(model)
    ids = _prompt(length=12)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model(ids).logits
        states = runner.exit_states(ids)
    for h in hooks:
        h.remove()
    assert states.shape == (7, 1, 12, 64) and runner.n_exits == 6
    assert (runner.logits(states[-1]) - ref).abs().max().item() < 1e-5
    for i in range(6):
        assert torch.equal(states[i + 1], captured[i])  # exit l is the block output, decoded by norm + head


def test_sublayer_exit_points(tiny_models: dict) -> None:
    model = tiny_models["eager"]
    runner = LayerwiseRunner(model, sublayer=True)
    ids = _prompt(length=10)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[0])) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model(ids).logits
        states = runner.exit_states(ids)
    for h in hooks:
        h.remove()
    assert runner.n_exits == 12 and states.shape[0] == 13
    assert runner.exit_units.tolist() == [0.5 * k for k in range(1, 13)]
    for i in range(6):
        assert torch.allclose(states[2 * i + 1], captured[i], atol=1e-6)  # after attention of layer i + 1
    assert (runner.logits(states[-1]) - ref).abs().max().item() < 1e-5  # post-FFN of layer L = the model


# ----------------------------------------------------------------------------------------------------- disabled EE
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_disabled_early_exit_equals_generate(tiny_models: dict, attn: str) -> None:
    model = tiny_models[attn]
    ids = _prompt(seed=3)
    hf = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                        pad_token_id=0, use_cache=True)[0, ids.shape[1]:].tolist()
    assert len(set(hf)) > 10
    for sublayer, threshold in ((False, 1.0), (True, None)):
        runner = LayerwiseRunner(model, sublayer=sublayer)
        gates = ExitGates(runner.n_exits - 1, 66)
        with torch.no_grad():
            gates.b2.fill_(30.0)  # sigmoid = 1.0 exactly in fp32: threshold 1.0 must still never exit
        assert torch.sigmoid(gates.forward_one(0, torch.zeros(1, 66))).item() == 1.0
        for kv in KV_MODES:
            res = early_exit_generate(runner, ids, 24, ExitPolicy(runner, "learned", threshold, gates), kv)
            assert res.tokens == hf, (sublayer, kv, threshold)
            assert res.avg_exit_layer == 6.0 and res.cache_lengths == [ids.shape[1] + 23] * 6


def test_disabled_early_exit_equals_generate_smollm2() -> None:
    torch.manual_seed(0)
    lm = EarlyExitLM(model="smollm2-135m", mode="gate", gate_threshold=1.0)
    tok = lm.tokenizer
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    hf = lm.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True,
                           pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    res = early_exit_generate(lm.runner, ids, 8, lm.policy(), "propagate")
    assert res.tokens == hf and res.exits == [30.0] * 8
    assert lm.runner.n_layers == 30


# ----------------------------------------------------------------------------------------------------- oracle
def test_oracle_on_constructed_states(tiny_models: dict) -> None:
    """Identical states (hence identical logits) from exit point k on give oracle k, with both implementations."""
    runner = LayerwiseRunner(tiny_models["sdpa"])
    g = torch.Generator().manual_seed(0)
    n_exits, k_true = 6, 3  # layer 4
    final = torch.randn(1, 64, generator=g)
    final_pred = int(runner.logits(final).argmax(-1))
    rows = []
    while len(rows) < k_true:
        h = torch.randn(1, 64, generator=g)
        if int(runner.logits(h).argmax(-1)) != final_pred:
            rows.append(h)
    states = torch.stack(rows + [final] * (n_exits - k_true))  # [n_exits, 1, d]
    preds = runner.exit_predictions(states)["pred"]
    assert int(oracle_exit(preds, "stable")) == k_true and int(oracle_exit(preds, "first")) == k_true
    oracle, n_rows = runner.stable_oracle(states)
    assert int(oracle) == k_true and n_rows == 1 + (n_exits - k_true)  # the top-down scan stops at the first miss
    states2 = states.clone()
    states2[1] = final  # an early match that does not last: first-match 1, stable still k
    preds2 = runner.exit_predictions(states2)["pred"]
    assert int(oracle_exit(preds2, "first")) == 1 and int(oracle_exit(preds2, "stable")) == k_true
    assert int(runner.stable_oracle(states2)[0]) == k_true


def test_stable_oracle_top_down_equals_full_scan(tiny_lm: EarlyExitLM) -> None:
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        states = tiny_lm.runner.exit_states(ids)[1:].flatten(1, 2)
    full = oracle_exit(tiny_lm.runner.exit_predictions(states)["pred"], "stable")
    assert torch.equal(tiny_lm.runner.stable_oracle(states, chunk=7)[0], full)


# ----------------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("kv_mode", KV_MODES)
def test_cache_invariant_with_forced_exits(tiny_models: dict, kv_mode: str) -> None:
    runner = LayerwiseRunner(tiny_models["sdpa"])
    ids = _prompt(seed=1)
    lengths: list[list[int]] = []
    policy = ForcedExit(runner, k=1, steps=set(range(1, 20, 2)))  # exit after layer 2 on alternate tokens
    res = early_exit_generate(runner, ids, 12, policy, kv_mode,
                              step_hook=lambda step, k, cache: lengths.append(
                                  [cache.layers[i].get_seq_length() for i in range(6)]))
    assert res.exits == [6.0] + [2.0 if s % 2 == 1 else 6.0 for s in range(1, 12)]
    if kv_mode == "lazy":  # pending layers wait for the next full-depth token or the final flush
        assert lengths[0] == [10, 10, 9, 9, 9, 9]
    else:
        assert all(row == [ids.shape[1] + s] * 6 for s, row in enumerate(lengths, start=1))
    assert res.cache_lengths == [ids.shape[1] + 11] * 6


def _final_cache(runner: LayerwiseRunner, ids: torch.Tensor, policy: ExitPolicy, kv_mode: str, n: int) -> tuple:
    caches = []
    res = early_exit_generate(runner, ids, n, policy, kv_mode, step_hook=lambda s, k, c: caches.append(c))
    return res, caches[-1]


@pytest.mark.parametrize("sublayer", [False, True], ids=["layer", "sublayer"])
def test_lazy_cache_equals_full_model_cache(sublayer: bool) -> None:
    # default initialisation (std 0.02): activations of order 1, so fp32 summation-order noise stays below 1e-5
    model = load_causal_lm("llama-tiny", config_overrides={k: v for k, v in TINY.items() if k != "initializer_range"})
    runner = LayerwiseRunner(model, sublayer=sublayer)
    ids = _prompt(seed=2)
    # exit after layer 2 (whole layers) or after layer 2's attention (sub-layers) on steps 1, 3 and 4
    res, cache = _final_cache(runner, ids, ForcedExit(runner, k=1 if not sublayer else 2, steps={1, 3, 4}), "lazy", 6)
    assert res.exits == [6.0, 2.0 if not sublayer else 1.5, 6.0, *([2.0 if not sublayer else 1.5] * 2), 6.0]
    fed = torch.cat([ids, torch.tensor([res.tokens[:-1]])], dim=1)  # the tokens that went through the model
    with torch.no_grad():
        ref = model.model(fed, use_cache=True).cache
    for i in range(6):
        assert cache.layers[i].keys.shape == ref.layers[i].keys.shape
        assert (cache.layers[i].keys - ref.layers[i].keys).abs().max().item() < 1e-5
        assert (cache.layers[i].values - ref.layers[i].values).abs().max().item() < 1e-5


def test_propagate_and_kv_copy_cache_entries(tiny_models: dict) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_models["sdpa"]
    runner = LayerwiseRunner(model)
    ids = _prompt(seed=4)
    t = ids.shape[1]  # the first decoding step's position
    res, cache = _final_cache(runner, ids, ForcedExit(runner, k=1, steps={1}), "propagate", 2)
    fed = torch.cat([ids, torch.tensor([[res.tokens[0]]])], dim=1)
    with torch.no_grad():
        h_e = runner.exit_states(fed)[2][:, t:t + 1]  # exit after layer 2 at position t (layers 1-2 are exact)
        pos = torch.tensor([[t]])
        cos, sin = model.model.rotary_emb(h_e, pos)
        for m in range(2, 6):
            attn = model.model.layers[m].self_attn
            x = model.model.layers[m].input_layernorm(h_e)
            k = attn.k_proj(x).view(1, 1, -1, 16).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, -1, 16).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            # h_e comes from a teacher-forced pass here: equal up to fp32 summation order (values up to ~7)
            assert torch.allclose(cache.layers[m].keys[:, :, t:t + 1], k, rtol=1e-5, atol=1e-5)
            assert torch.allclose(cache.layers[m].values[:, :, t:t + 1], v, rtol=1e-5, atol=1e-5)
    res, cache = _final_cache(runner, ids, ForcedExit(runner, k=1, steps={1}), "kv_copy", 2)
    for m in range(2, 6):
        assert torch.equal(cache.layers[m].keys[:, :, t], cache.layers[1].keys[:, :, t])
        assert torch.equal(cache.layers[m].values[:, :, t], cache.layers[1].values[:, :, t])


# ----------------------------------------------------------------------------------------------------- gates
def test_lower_thresholds_never_raise_the_average_exit(tiny_lm: EarlyExitLM) -> None:
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tiny_lm.hparams.gate = "confidence"  # computes the logit scores too
    with torch.no_grad():
        tiny_lm.gates.b2.zero_()  # scores spread around 0.5 so that the thresholds matter
        out = tiny_lm._exit_pass(batch, train_lm=False)
    for rule in ("learned", "confidence", "entropy"):
        tiny_lm.hparams.gate = rule
        scores = tiny_lm._rule_scores(out)
        means = [tiny_lm.runner.exit_units[first_exit(scores, t, 0)].mean().item() for t in (0.95, 0.9, 0.8, 0.5, 0.1)]
        assert all(a >= b for a, b in itertools.pairwise(means)), (rule, means)
    tiny_lm.hparams.gate = "learned"
    assert means[0] > means[-1]
    # free-running decoding on a fixed prompt set: the average exit falls with the threshold too
    prompts = [_prompt(seed=s, length=6) for s in range(3)]
    avgs = []
    for t in (1.0, 0.7, 0.5, 0.0):
        res = [early_exit_generate(tiny_lm.runner, p, 6, tiny_lm.policy(t), "propagate") for p in prompts]
        avgs.append(sum(r.avg_exit_layer for r in res) / 3)
    assert avgs[0] == 6.0 and avgs[-1] == pytest.approx((6 + 5 * 1) / 6)  # tau 0: every decoded token exits at layer 1
    assert all(a >= b for a, b in itertools.pairwise(avgs)), avgs


def _train_steps(lm: EarlyExitLM, steps: int, seed: int = 0) -> None:
    opt = lm.configure_optimizers()
    g = torch.Generator().manual_seed(seed)
    lm.train()
    for _ in range(steps):
        ids = torch.randint(3, 256, (2, 16), generator=g)
        loss = lm.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_backbone_training_changes_only_gates() -> None:
    torch.manual_seed(0)
    lm = tiny_early_exit(mode="gate")
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    _train_steps(lm, 3)
    after = lm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"gates.w1", "gates.b1", "gates.w2", "gates.b2", "gates.oracle_hist"} == changed
    assert all(not p.requires_grad for p in lm.model.parameters())

    joint = tiny_early_exit(mode="gate", finetune_lm=True, lm_trainable_layers=[1], lm_lr=1e-3)
    before = {k: v.clone() for k, v in joint.state_dict().items()}
    _train_steps(joint, 2)
    changed = {k for k, v in joint.state_dict().items() if not torch.equal(before[k], v)}
    assert {k for k in changed if not k.startswith("gates.")} == {k for k in before if k.startswith("model.model.layers.1.")}


def test_gate_learns_better_than_baselines() -> None:
    """100 steps on a frozen tiny model with structured synthetic text (4-token motifs over 8 token ids, repeated):
    validation BCE below the class-prior BCE and gate accuracy at least the majority baseline."""
    torch.manual_seed(0)
    lm = tiny_early_exit(mode="gate", gate_threshold=0.5, lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        motifs = torch.randint(3, 11, (4, 4), generator=g)
        ids = motifs.repeat(1, 8)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    opt = lm.configure_optimizers()
    lm.train()
    for _ in range(100):
        loss = lm.training_step(batch(), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    lm._stats = {}
    with torch.no_grad():
        for _ in range(4):
            lm._eval_step(batch())
    rep = lm.analysis_report()
    assert rep["gate_bce"] < rep["gate_bce_prior"]
    assert rep["gate_acc"] >= rep["gate_acc_majority"]


# ----------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(tiny_models: dict) -> None:
    kw = {"model": "llama-tiny", "model_config_overrides": TINY, "tokenizer": ByteTokenizer()}
    with pytest.raises(ValueError, match=r"gate_threshold must be in \[0, 1\]"):
        EarlyExitLM(**kw, gate_threshold=1.5)
    with pytest.raises(ValueError, match=r"min_exit_layer must be in \[1, 6\]"):
        EarlyExitLM(**kw, min_exit_layer=7)
    with pytest.raises(ValueError, match=r"kv_mode must be one of \['propagate', 'kv_copy', 'lazy'\]"):
        EarlyExitLM(**kw, kv_mode="copy")
    with pytest.raises(ValueError, match=r"gate must be one of"):
        EarlyExitLM(**kw, gate="oracle")
    with pytest.raises(IndexError, match="layer index 9 is out of range"):
        EarlyExitLM(**kw, finetune_lm=True, lm_trainable_layers=[9])
    model = load_causal_lm("llama-tiny", config_overrides=TINY)
    del model.model.layers
    with pytest.raises(TypeError, match=r"missing model\.model\.layers"):
        LayerwiseRunner(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match=r"LLaMA-family causal LMs; missing model\.model"):
        LayerwiseRunner(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)))
    runner = LayerwiseRunner(tiny_models["sdpa"])
    with pytest.raises(ValueError, match="early-exit decoding runs with batch size 1"):
        early_exit_generate(runner, torch.ones(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=2048"):
        early_exit_generate(runner, torch.ones(1, 2040, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="forced_tokens needs 4 ids"):
        early_exit_generate(runner, torch.ones(1, 4, dtype=torch.long), 5, forced_tokens=[1, 2])


def test_gates_of_another_model_are_refused() -> None:
    small = tiny_early_exit(overrides={"num_hidden_layers": 4})
    big = tiny_early_exit()
    ckpt = {"state_dict": {k: v for k, v in small.state_dict().items() if k.startswith("gates.")},
            "litlab_gates_only": True}
    with pytest.raises(ValueError, match=r"4 exit points x 66 features x width 32; this model needs 6 exit points"):
        big.on_load_checkpoint(ckpt)
    own = {"state_dict": {k: v.clone() for k, v in big.state_dict().items() if k.startswith("gates.")},
           "litlab_gates_only": True}
    big.on_load_checkpoint(own)  # a gates-only checkpoint is completed with the LM weights
    assert set(own["state_dict"]) == set(big.state_dict())
