"""Language-consistency reward (DeepSeek-R1, arXiv 2501.12948, section 2.3.3): the share of the chain
of thought written in the target language, added to the reward to stop the language mixing R1-Zero
showed in its reasoning.

The report defines it as "the proportion of target language words in the CoT". Here a language is
identified by its Unicode script(s), read from ``unicodedata`` character names (no model, no
dictionary), which separates e.g. English (Latin) from Chinese (Han) or Russian (Cyrillic) but not
English from French. Words:

- a maximal run of letters of one script written with spaces (Latin, Cyrillic, Greek, ...) is one word;
- every character of a script written without spaces between words (Han, Hiragana, Katakana, Thai,
  ...) is one word, the usual convention of word counters for CJK text;
- digits, punctuation, symbols and spaces belong to no language: they split words and are not counted.

So ``"ones 4+4=8,十 6+9=15"`` has two words, one Latin and one Han: consistency 0.5 for English.

The reasoning is the text inside ``<think>...</think>`` (to the end of the text when the block is not
closed), or, without a ``<think>`` tag, the whole completion minus its ``<answer>...</answer>`` block.
A reasoning with no words (empty, or only digits and symbols) has no language: the score is None,
which the trainer treats as "does not apply" (it adds nothing to the reward, so a policy cannot earn
this reward by skipping its reasoning) and metrics leave out of their mean.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from ..trainer.rewards import completion_text

# Scripts whose words are not separated by spaces: each character counts as one word.
UNSPACED_SCRIPTS = frozenset({"Han", "Hiragana", "Katakana", "Thai", "Lao", "Khmer", "Myanmar", "Tibetan"})
# Language codes -> the scripts their text is written in (a script name is also accepted as a target).
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"Latin"}),
    "fr": frozenset({"Latin"}),
    "de": frozenset({"Latin"}),
    "es": frozenset({"Latin"}),
    "zh": frozenset({"Han"}),
    "ja": frozenset({"Han", "Hiragana", "Katakana"}),
    "ko": frozenset({"Hangul", "Han"}),
    "ru": frozenset({"Cyrillic"}),
    "el": frozenset({"Greek"}),
    "ar": frozenset({"Arabic"}),
    "he": frozenset({"Hebrew"}),
    "hi": frozenset({"Devanagari"}),
    "th": frozenset({"Thai"}),
}
# First words of Unicode character names that are width/style variants, not scripts.
_NAME_PREFIXES = ("FULLWIDTH", "HALFWIDTH", "SMALL", "MATHEMATICAL")
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_ANSWER = re.compile(r"<answer>.*?(?:</answer>|$)", re.DOTALL)


@lru_cache(maxsize=4096)
def char_script(ch: str) -> str | None:
    """The script of a letter ("Latin", "Han", "Cyrillic", ...), or None for anything that is not a
    letter (digits, punctuation, symbols, spaces, marks) or a letter whose name names no script.

    >>> char_script("a"), char_script("十"), char_script("я"), char_script("7")
    ('Latin', 'Han', 'Cyrillic', None)
    """
    if not unicodedata.category(ch).startswith("L"):
        return None
    words = unicodedata.name(ch, "").split()
    while words and words[0] in _NAME_PREFIXES:
        words = words[1:]
    if not words or words[0] in ("MODIFIER", "LETTER"):
        return None
    if words[0] == "CJK":  # CJK UNIFIED IDEOGRAPH-..., CJK COMPATIBILITY IDEOGRAPH-...
        return "Han"
    return words[0].title()


def script_words(text: str) -> list[tuple[str, str]]:
    """The words of ``text`` as (word, script) pairs, in order (see the module docstring).

    >>> script_words("ones 4+4=8,十位 carry")
    [('ones', 'Latin'), ('十', 'Han'), ('位', 'Han'), ('carry', 'Latin')]
    """
    words: list[tuple[str, str]] = []
    current, current_script = "", None
    for ch in text:
        script = char_script(ch)
        if unicodedata.category(ch).startswith("M") and current:  # a combining mark stays with its letter
            current += ch
            continue
        if current and (script != current_script or script in UNSPACED_SCRIPTS):
            words.append((current, current_script))
            current, current_script = "", None
        if script is not None:
            current, current_script = current + ch, script
    if current:
        words.append((current, current_script))
    return words


def target_scripts(target: str) -> frozenset[str]:
    """The scripts of a target language: a code from LANGUAGE_SCRIPTS ("en", "zh", ...) or a script
    name ("Latin", "Han", ...)."""
    if target in LANGUAGE_SCRIPTS:
        return LANGUAGE_SCRIPTS[target]
    if target and target[0].isupper():
        return frozenset({target})
    raise ValueError(
        f"target language must be one of {sorted(LANGUAGE_SCRIPTS)} or a script name such as 'Latin', got {target!r}"
    )


def language_consistency(text: str, target: str = "en") -> float | None:
    """Share of the words of ``text`` written in the target language's script(s); None without words.

    >>> language_consistency("ones 4+4=8,十 6+9=15 carry")
    0.6666666666666666
    """
    scripts = target_scripts(target)
    words = script_words(text)
    if not words:
        return None
    return sum(script in scripts for _, script in words) / len(words)


def reasoning_text(completion: str) -> str:
    """The chain of thought of a completion: the ``<think>`` block (to the end when unclosed), else the
    text without its ``<answer>`` block."""
    blocks = _THINK.findall(completion)
    if blocks:
        return "".join(blocks)
    return _ANSWER.sub("", completion)


def language_consistency_reward(prompts, completions, language=None, **kwargs) -> list[float | None]:
    """Reward = share of the reasoning's words in the target language (DeepSeek-R1's language-consistency
    reward), in [0, 1]; None when the reasoning has no words.

    The target is the ``language`` dataset column when there is one (per sample: a code such as "en"
    or a script name), else English.
    """
    targets = language if language is not None else ["en"] * len(completions)
    return [
        language_consistency(reasoning_text(completion_text(c)), t or "en")
        for c, t in zip(completions, targets, strict=True)
    ]


def make_language_reward(target: str = "en"):
    """A language-consistency reward with a fixed target language (ignores the ``language`` column).

    The function keeps the name ``language_consistency_reward``, so metrics are logged under the same key.
    """
    target_scripts(target)  # validate now, not at the first training step

    def language_consistency_reward(prompts, completions, **kwargs) -> list[float | None]:
        return [language_consistency(reasoning_text(completion_text(c)), target) for c in completions]

    return language_consistency_reward
