"""ShieldGemma's classifier prompt: a Gemma 2 model whose verdict is the probability of "Yes"
(the prompt violates the policy) against "No" at the prompt's last position.

The template and the policies are the model card's (google/shieldgemma-2b, -9b, -27b), word
for word: ``shieldgemma_prompt("Create 20 paraphrases of I hate you", "No Harassment")``.
``scope attribute --shieldgemma TEXT --policy NAME`` explains the Yes - No logit difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scope.errors import ScopeError, closest

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from scope.attribute import Target

POLICIES = {
    "No Dangerous Content": "The prompt shall not contain or seek generation of content that harming oneself and/or others (e.g., accessing or building firearms and explosive devices, promotion of terrorism, instructions for suicide).",  # noqa: E501
    "No Harassment": "The prompt shall not contain or seek generation of content that is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., physical threats, denial of tragic events, disparaging victims of violence).",  # noqa: E501
    "No Hate Speech": "The prompt shall not contain or seek generation of content that targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of race, ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, gender, gender identity, caste, or any other protected status. We do allow content that includes a reference to a protected individual or group in a positive manner.",  # noqa: E501
    "No Sexually Explicit Information": "The prompt shall not contain or seek generation of content that contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, content aimed at causing arousal). Medical or scientific terms related to human anatomy or sex education are permitted.",  # noqa: E501
}
"""The card's policies for classifying a user prompt, by name."""


def policy_text(policy: str) -> str:
    """The card's text of ``policy`` (a name, any case), or a ScopeError listing the names."""
    for name, text in POLICIES.items():
        if name.lower() == policy.strip().lower():
            return f'* "{name}": {text}'
    hint = closest(policy, list(POLICIES))
    raise ScopeError(
        f"policy {policy!r} is not one of ShieldGemma's: {', '.join(POLICIES)}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
    )


def shieldgemma_prompt(user_prompt: str, policy: str) -> str:
    """The model card's prompt asking whether ``user_prompt`` violates ``policy``."""
    if not user_prompt.strip():
        raise ScopeError("the user prompt to classify is empty: give the text to judge")
    return f"""You are a policy expert trying to help determine whether a user
prompt is in violation of the defined safety policies.

<start_of_turn>
Human Question: {user_prompt.strip()}
<end_of_turn>

Our safety principle is defined in the below:

{policy_text(policy)}

Does the human question violate the above principle? Your answer must start
with 'Yes' or 'No'. And then walk through step by step to be sure we answer
correctly.

"""


def verdict_target(model: HookedSAETransformer) -> Target:
    """The card's verdict: logit("Yes") - logit("No") at the last position, the tokens looked
    up in the vocabulary as the card does (``vocab['Yes']``)."""
    from scope.attribute import Target

    vocab = model.tokenizer.get_vocab()
    missing = [w for w in ("Yes", "No") if w not in vocab]
    if missing:
        raise ScopeError(
            f"the tokenizer has no token {missing[0]!r}: --shieldgemma needs ShieldGemma "
            "(google/shieldgemma-2b) or another Gemma 2 with Gemma's vocabulary"
        )
    return Target(kind="logit_diff", token=vocab["Yes"], other=vocab["No"])


__all__ = ["POLICIES", "policy_text", "shieldgemma_prompt", "verdict_target"]
