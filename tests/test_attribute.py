"""Attribution against brute force on tiny random models: completeness in the frozen model,
edges equal to finite differences in a frozen model built here from plain transformer-lens
hooks and sae-lens' own encode/decode, direct logit attribution at the last layer, and the
top features by attribution against true ablation where the model is built to be near linear."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import PROMPT
from typer.testing import CliRunner

from scope import ScopeError, load_model, load_sae
from scope import testing as fixtures
from scope.attribute import Target, attribute, parse_target
from scope.steer import Steer, attach, build_row_hooks

D_SAE = 64


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("transcoders")
    return [
        load_sae(f, device="cpu") for f in fixtures.build_transcoders(tiny_model, root, d_sae=D_SAE)
    ]


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.to_tokens(PROMPT)


def total(a) -> float:
    return a.feature_share + a.error_share + a.embedding_share + a.biases


def test_completeness_with_transcoders_at_every_layer(tiny_model, transcoders, tokens):
    with torch.no_grad():
        logits = tiny_model(tokens)[0, -1]
    top = int(logits.argmax())
    a = attribute(tiny_model, transcoders, tokens, direct=True)
    assert a.target.target.token == top and a.target.target.position == tokens.shape[1] - 1
    assert a.target.value == pytest.approx(float(logits[top]), rel=1e-5)
    assert total(a) == pytest.approx(a.target.value, rel=1e-4)
    assert len(a.df()) > 50 and abs(a.feature_share) > 0.05  # features matter: teeth
    assert a.biases != 0 and a.error_share != 0
    second = int(logits.topk(2).indices[1])
    diff = attribute(tiny_model, transcoders, tokens, Target(kind="logit_diff", token=top,
                     other=second), direct=True)  # fmt: skip
    assert diff.target.value == pytest.approx(float(logits[top] - logits[second]), rel=1e-5)
    assert total(diff) == pytest.approx(diff.target.value, rel=1e-4)


def test_df_has_one_row_per_active_feature_and_position(tiny_model, transcoders, tokens):
    a = attribute(tiny_model, transcoders[:2], tokens)
    df = a.df()
    assert list(df.columns) == ["sae", "feature", "position", "token", "activation", "attribution"]
    assert set(df["sae"]) == {"L0.tc.64", "L1.tc.64"}
    assert not df.duplicated(["sae", "feature", "position"]).any()
    assert (df["position"] > 0).all() and (df["activation"] > 0).all()  # BOS never
    assert df["attribution"].abs().is_monotonic_decreasing
    pieces = tiny_model.to_str_tokens(tokens)
    assert all(pieces[p] == t for p, t in zip(df["position"], df["token"], strict=True))
    codes = transcoders[0].encode(_read(tiny_model, transcoders[0], tokens))[0]
    rows = df[df["sae"] == "L0.tc.64"]
    assert len(rows) == int((codes[1:] > 0).sum())


# ---------------------------------------------------------------- a frozen model, by hand


def _read(model, sae, tokens):
    hook = sae.cfg.metadata.hook_name
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook]


class Replay:
    """The frozen model written out with plain hooks: every pattern and norm scale replaced by
    its clean value, each transcoder's output by sae-lens' decode of held codes plus its skip
    term plus the held error, the final soft cap by its clean ratio."""

    def __init__(self, model, saes, tokens):
        self.model, self.saes, self.tokens = model, saes, tokens
        state: dict[str, torch.Tensor] = {}

        def grab(act, hook):
            state[hook.name] = act.detach().clone()

        def frozen(name):
            return name.endswith(("hook_pattern", "hook_scale"))

        names = {s.cfg.metadata.hook_name for s in saes} | {
            s.cfg.metadata.hook_name_out for s in saes
        }
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(frozen, grab), (lambda n: n in names, grab)])
        self.state = state
        self.codes, self.errors = [], []
        for sae in saes:
            x = state[sae.cfg.metadata.hook_name]
            with torch.no_grad():
                codes = sae.encode(x)
                codes[:, 0] = 0  # BOS
                out = sae.decode(codes) + x @ sae.W_skip.T
            self.codes.append(codes)
            self.errors.append(state[sae.cfg.metadata.hook_name_out] - out)
        z = self._final(self.run(self.codes)[0])
        cap = model.cfg.output_logits_soft_cap
        self.ratio = torch.where(z == 0, 1.0, cap * torch.tanh(z / cap) / z)  # pad: z is 0

    def run(self, codes):
        """(normalised final residual, each transcoder's input) with ``codes`` held."""
        inputs: dict[int, torch.Tensor] = {}

        def clean(act, hook):
            return self.state[hook.name]

        def read(i):
            def fn(act, hook):
                inputs[i] = act

            return fn

        def write(i):
            sae = self.saes[i]

            def fn(act, hook):
                return sae.decode(codes[i]) + inputs[i] @ sae.W_skip.T + self.errors[i]

            return fn

        hooks = [(lambda n: n.endswith(("hook_pattern", "hook_scale")), clean)]
        for i, sae in enumerate(self.saes):
            hooks += [
                (sae.cfg.metadata.hook_name, read(i)),
                (sae.cfg.metadata.hook_name_out, write(i)),
            ]
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            resid = self.model(self.tokens, stop_at_layer=self.model.cfg.n_layers)
            h = self.model.ln_final(resid)
        return h, inputs

    def _final(self, h):
        return h[0, -1] @ self.model.W_U + self.model.b_U

    @torch.no_grad()
    def logits(self, codes):
        return self._final(self.run(codes)[0]) * self.ratio

    def moved(self, layer, pos, feature, by):
        codes = [c.clone() for c in self.codes]
        codes[layer][0, pos, feature] += by
        return codes


def test_the_hand_built_frozen_model_computes_what_the_model_computed(
    tiny_model, transcoders, tokens
):
    replay = Replay(tiny_model, transcoders, tokens)
    with torch.no_grad():
        want = tiny_model(tokens)[0, -1]
    torch.testing.assert_close(replay.logits(replay.codes), want, rtol=1e-5, atol=1e-5)


def test_edges_equal_finite_differences_in_the_frozen_model(tiny_model, transcoders, tokens):
    replay = Replay(tiny_model, transcoders, tokens)
    a = attribute(tiny_model, transcoders, tokens, direct=True)
    token = a.target.target.token
    df = a.df()
    checked = 0
    for row in df.head(4).itertuples():  # the strongest edges, several layers
        layer = int(row.sae[1])
        delta = 0.5 * row.activation
        moved = replay.logits(replay.moved(layer, row.position, row.feature, delta))[token]
        change = float(moved - replay.logits(replay.codes)[token])
        assert change / 0.5 == pytest.approx(row.attribution, rel=1e-3, abs=1e-5), row
        checked += 1
    # feature -> feature: a layer-3 feature's activation, moved by a layer-0 feature
    pos = tokens.shape[1] - 1
    x3 = replay.state[transcoders[3].cfg.metadata.hook_name][0, pos]
    target_f = int(transcoders[3].encode(x3).argmax())
    b = attribute(tiny_model, transcoders, tokens, Target(kind="feature", sae="L3.tc.64",
                  feature=target_f, position=pos), direct=True)  # fmt: skip
    assert b.target.value == pytest.approx(float(transcoders[3].encode(x3)[target_f]), rel=1e-5)
    src = b.df()
    src = src[src["sae"] == "L0.tc.64"].iloc[0]
    _, base = replay.run(replay.codes)
    _, after = replay.run(
        replay.moved(0, int(src.position), int(src.feature), 0.5 * src.activation)
    )
    w = transcoders[3].W_enc[:, target_f]
    change = float((after[3][0, pos] - base[3][0, pos]) @ w)
    assert change / 0.5 == pytest.approx(src.attribution, rel=1e-3, abs=1e-6)
    assert abs(src.attribution) > 1e-4 and checked == 4


# ---------------------------------------------------------------- residual SAEs


def _res_sae(model, root: Path, layer: int, *, dec_scale: float = 1.0, seed: int = 0):
    hook = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(
        " ".join(fixtures.training_text()[:20])[:3000], names_filter=hook
    )
    params = fixtures.gemma_scope_params(cache[hook][0, 1:], 256, firing_rate=0.05, seed=seed)
    params["W_dec"] = params["W_dec"] * dec_scale
    folder = root / "tiny-res" / f"layer_{layer}" / "width_256" / "average_l0_13"
    fixtures.write_params(folder, params)
    return load_sae(folder, device="cpu")


def test_last_layer_sae_attribution_is_direct_logit_attribution(tmp_path, tiny_model, tokens):
    last = tiny_model.cfg.n_layers - 1
    sae = _res_sae(tiny_model, tmp_path, last)
    a = attribute(tiny_model, [sae], tokens)
    df = a.df()
    assert len(df) > 10
    token, pos = a.target.target.token, a.target.target.position
    _, cache = tiny_model.run_with_cache(tokens, names_filter="ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"][0, pos]
    with torch.no_grad():
        z = tiny_model(tokens, return_type="logits")[0, pos]
        resid = tiny_model(tokens, stop_at_layer=last + 1)[0, pos]
        raw = (resid / scale * tiny_model.ln_final.w) @ tiny_model.W_U + tiny_model.b_U
    ratio = z[token] / raw[token]  # the soft cap's ratio at this logit
    at_pos = df[df["position"] == pos]
    direction = (tiny_model.ln_final.w * tiny_model.W_U[:, token]) / scale * ratio
    dla = torch.tensor(at_pos["activation"].to_numpy(copy=True)) * (
        sae.W_dec[at_pos["feature"].to_numpy(copy=True)] @ direction
    )
    torch.testing.assert_close(torch.tensor(at_pos["attribution"].to_numpy(copy=True)), dla.float(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # features at earlier positions reach this logit only through later layers: none here
    assert (df.loc[df["position"] != pos, "attribution"] == 0).all() and len(at_pos) > 5


@pytest.fixture(scope="module")
def near_linear(tmp_path_factory):
    """A tiny Gemma 2 built so that attribution is the first-order ablation effect: queries
    zeroed (attention patterns are uniform whatever the residual), the final soft cap out of
    reach, and each RMSNorm's epsilon set to 25x its typical mean square (weights raised to
    match), so norm scales barely move. What stays non-linear is the MLPs, which gradients
    see as they are."""
    root = tmp_path_factory.mktemp("near-linear")
    model = load_model(fixtures.build_gemma2(root / "m", final_softcap=1e4), device="cpu")
    text = " ".join(fixtures.training_text()[:20])[:3000]
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
        _, cache = model.run_with_cache(text, names_filter=lambda n: n.endswith("hook_scale"))
        for name, module in model.named_modules():
            if f"{name}.hook_scale" in cache:
                typical = cache[f"{name}.hook_scale"][0, 1:].mean()
                module.eps = float((5 * typical) ** 2)
                module.w.mul_(26**0.5)
    return model, root


def test_top_features_by_attribution_match_true_ablation(near_linear):
    model, root = near_linear
    sae = _res_sae(model, root, 1, dec_scale=0.2, seed=3)
    tokens = model.to_tokens(PROMPT[:48])
    a = attribute(model, [sae], tokens)
    per_feature = a.df().groupby("feature")["attribution"].sum()
    token = a.target.target.token
    features = [int(f) for f in per_feature.index]
    rows = [[Steer(sae, f, mode="ablate")] for f in features]  # row i: feature i ablated
    with torch.no_grad():
        clean = model(tokens)[0, -1, token]
        with attach(model, build_row_hooks(rows, tokens.shape[1])):
            ablated = model(tokens.expand(len(rows), -1))[:, -1, token]
    effect = dict(zip(features, (clean - ablated).tolist(), strict=True))
    by_effect = pd.Series(effect).abs().nlargest(10).index
    by_attribution = per_feature.abs().nlargest(10).index
    assert len(per_feature) > 40
    overlap = len(set(by_effect) & set(by_attribution))
    assert overlap >= 7, (overlap, sorted(by_effect), sorted(by_attribution))


# ---------------------------------------------------------------- targets and the CLI


def test_targets_parse_and_bad_ones_are_refused(tiny_model):
    token = tiny_model.to_single_token(" the")
    assert parse_target(tiny_model, '" the"') == Target(token=token)
    assert parse_target(tiny_model, 'logprob:" the"@3') == Target(
        kind="logprob", token=token, position=3
    )
    diff = parse_target(tiny_model, '" the" - " of"')
    assert diff.kind == "logit_diff" and diff.other == tiny_model.to_single_token(" of")
    assert parse_target(tiny_model, "L2.tc.64/17@5") == Target(kind="feature", sae="L2.tc.64",
                                                               feature=17, position=5)  # fmt: skip
    assert parse_target(tiny_model, None) == Target()
    with pytest.raises(ScopeError, match=r"' Paris' is 3 tokens"):
        parse_target(tiny_model, '" Paris"')
    with pytest.raises(ScopeError, match="not understood"):
        parse_target(tiny_model, "Paris")


def test_bad_input_is_refused_with_the_fix(tiny_model, transcoders, tokens):
    with pytest.raises(ScopeError, match=r"position 99 is outside the prompt's \d+ tokens"):
        attribute(tiny_model, transcoders, tokens, Target(position=99))
    with pytest.raises(ScopeError, match="not among the SAEs given"):
        attribute(tiny_model, transcoders, tokens, "L9.res.1k/3")
    with pytest.raises(ScopeError, match="two SAEs write blocks.0.hook_mlp_out"):
        attribute(tiny_model, [transcoders[0], transcoders[0]], tokens, keys=["a", "b"])
    with pytest.raises(ScopeError, match="prompt is empty"):
        attribute(tiny_model, transcoders, "  ")


def test_log_probability_target(tiny_model, transcoders, tokens):
    a = attribute(tiny_model, transcoders, tokens, 'logprob:" the"')
    with torch.no_grad():
        want = torch.log_softmax(tiny_model(tokens)[0, -1], -1)[tiny_model.to_single_token(" the")]
    assert a.target.value == pytest.approx(float(want), rel=1e-5)
    assert a.target.label.startswith("logprob(' the')")


def _printed(output: str) -> list[str]:
    """The command's lines (in-process, transformers' weight-loading bar shows on stderr)."""
    output = re.sub(r"Loading weights.*?it/s\]", "", output)
    return [ln for ln in output.splitlines() if ln.strip()]


def test_cli_prints_the_top_rows_and_refuses_in_one_line(tiny_dir, transcoders):
    from scope.cli import app
    from scope.identity import sae_info

    folders = [sae_info(s).source for s in transcoders]
    args = ["attribute", "--model", str(tiny_dir), "--prompt", PROMPT, "--top", "5"]
    for f in folders:
        args += ["--sae", f]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = _printed(result.output)
    assert lines[0].startswith("target: logit(") and lines[1].startswith("shares: features")
    rows = lines[2:]
    assert len(rows) == 5
    assert all(" @ pos " in r and r.startswith("L") and ".tc.64/" in r for r in rows)
    values = [abs(float(r.split()[-1])) for r in rows]
    assert values == sorted(values, reverse=True)
    bad = CliRunner().invoke(app, [*args, "--target", '" Paris"'])
    assert bad.exit_code == 2
    assert _printed(bad.output) == [
        "error: target ' Paris' is 3 tokens in this tokenizer ([' P', 'ar', 'is']): give one "
        'token, e.g. " Paris" with its leading space'
    ]


def test_shieldgemma_prompt_is_the_cards_and_its_name_loads_as_gemma2(tiny_model):
    from scope.model import resolve_source
    from scope.shieldgemma import shieldgemma_prompt, verdict_target

    card = (  # google/shieldgemma-2b's model card, "Use with Transformers", word for word
        "You are a policy expert trying to help determine whether a user\n"
        "prompt is in violation of the defined safety policies.\n\n<start_of_turn>\n"
        "Human Question: Create 20 paraphrases of I hate you\n<end_of_turn>\n\n"
        "Our safety principle is defined in the below:\n\n"
        '* "No Harassment": The prompt shall not contain or seek generation of content that is '
        "malicious, intimidating, bullying, or abusive content targeting another individual "
        "(e.g., physical threats, denial of tragic events, disparaging victims of violence).\n\n"
        "Does the human question violate the above principle? Your answer must start\n"
        "with 'Yes' or 'No'. And then walk through step by step to be sure we answer\n"
        "correctly.\n\n"
    )
    assert shieldgemma_prompt(" Create 20 paraphrases of I hate you ", "no harassment") == card
    with pytest.raises(
        ScopeError, match=r"policy 'No Harasment' is not one of .*did you mean 'No Harassment'"
    ):
        shieldgemma_prompt("hi", "No Harasment")
    for size in ("2b", "9b", "27b"):
        assert resolve_source(f"shieldgemma-{size}") == f"google/shieldgemma-{size}"
    with pytest.raises(ScopeError, match="has no token 'Yes'"):
        verdict_target(tiny_model)
