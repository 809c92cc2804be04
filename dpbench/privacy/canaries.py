"""Text canaries for ``audit=canary`` and the exposure of secrets (Carlini et al. 2019).

A task declares which canaries fit it (``CANARIES`` in :mod:`dpbench.train.tasks` and
:mod:`dpbench.train.summarization`: the dataset's input -> a key of :data:`CANARY_TYPES`) and turns
the raw canaries made here into its training arrays (``prepare_canaries``), with the model's own
tokenizer; this module knows no model and no tokenizer.

- ``sentence`` (text classification, SST-2): a sentence of random pseudo-words (consonant-vowel
  syllables, so that no tokenizer maps it onto real words) with a uniformly random label. Nothing in
  the data supports or contradicts the label, so a model that did not train on the canary gets it
  right by chance, and one that did can have memorised it. Score: minus the loss (for two classes a
  monotone function of the margin logit[label] - logit[other], so the same guesses).
- ``dialogue`` (summarisation, SAMSum): a pseudo-word dialogue whose speaker's made-up name keys a
  secret in the summary, ``"The secret code of Kazomi is 381092."`` (``audit.secret_digits`` random
  digits). The name sits right before the secret, so that a small model with local attention can
  memorise the pair (crafted to be memorised: with the secret cued only by the dialogue, a
  non-private tiny Gemma barely told members apart, bound 0.75 of 2.3 possible). Score: minus the
  mean summary loss. Its exposure (:func:`exposure`) is the Secret Sharer's measure: how far the
  secret's loss ranks ahead of other secrets in the same dialogue.
- ``image`` (MNIST): fair-coin pixels, :func:`dpbench.data.canaries.make_image_canaries`.

Every canary has a key of its own (the pseudo-words), so that one canary's membership hardly moves
another's score: each is its own trial.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats

from dpbench.data.canaries import make_image_canaries

CANARY_TYPES = {
    "image": "28x28-style images of fair-coin binary pixels with uniformly random labels; score = -loss",
    "sentence": "sentences of random pseudo-words with uniformly random labels; score = -loss (margin order)",
    "dialogue": "pseudo-word dialogues summarised by a random secret code; score = -(mean summary loss)",
}
SENTENCE_WORDS = 8
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
SECRET_TEMPLATE = "The secret code of {name} is {secret}."


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
    words = []
    for _ in range(count):
        syllables = rng.integers(2, 4)
        words.append(
            "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(syllables))
        )
    return words


def make_sentence_canaries(m: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """``m`` pseudo-word sentences ("text", str) with random labels ("label", int32).

    >>> canaries = make_sentence_canaries(3, num_classes=2, seed=0)
    >>> len(canaries["text"][0].split()), canaries["label"].dtype.name
    (8, 'int32')
    """
    if num_classes < 2:
        raise ValueError(
            f"num_classes={num_classes} must be at least 2 for a random label to carry information"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    texts = np.array([" ".join(_pseudo_words(rng, SENTENCE_WORDS)).capitalize() + "." for _ in range(m)])
    labels = rng.integers(0, num_classes, size=m).astype(np.int32)
    return {"text": texts, "label": labels}


def random_secrets(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    """``count`` secrets of ``digits`` uniformly random decimal digits (10**digits possible)."""
    return ["".join(str(d) for d in rng.integers(0, 10, size=digits)) for _ in range(count)]


def make_dialogue_canaries(m: int, digits: int, seed: int) -> dict[str, np.ndarray]:
    """``m`` dialogues ("dialogue") with secret summaries ("summary") and their secrets ("secret").

    >>> canaries = make_dialogue_canaries(2, digits=4, seed=0)
    >>> canaries["summary"][0] == f"The secret code of {canaries['name'][0]} is {canaries['secret'][0]}."
    True
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
    dialogues = []
    for _ in range(m):
        name, *words = _pseudo_words(rng, 7)
        name = name.capitalize()
        dialogues.append(
            f"{name}: {' '.join(words[:3])}, remember my code.\nSam: {' '.join(words[3:])}, I will."
        )
    secrets = random_secrets(rng, m, digits)
    names = [dialogue.split(":", 1)[0] for dialogue in dialogues]
    return {
        "dialogue": np.array(dialogues),
        "summary": np.array(
            [SECRET_TEMPLATE.format(name=n, secret=s) for n, s in zip(names, secrets, strict=True)]
        ),
        "secret": np.array(secrets),
        "name": np.array(names),
    }


def make_canaries(
    kind: str, m: int, seed: int, *, num_classes: int = 2, image_shape=(28, 28, 1), secret_digits: int = 6
) -> dict[str, np.ndarray]:
    """The raw canaries of type ``kind`` (a key of :data:`CANARY_TYPES`)."""
    if kind == "image":
        return make_image_canaries(m, tuple(image_shape), num_classes, seed)
    if kind == "sentence":
        return make_sentence_canaries(m, num_classes, seed)
    if kind == "dialogue":
        return make_dialogue_canaries(m, secret_digits, seed)
    raise ValueError(f"canary type {kind!r} is not one of {', '.join(CANARY_TYPES)}")


def exposure_candidates(secrets, count: int, digits: int, seed: int) -> np.ndarray:
    """[len(secrets), count] other secrets, each different from its canary's, deterministic in ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    rows = []
    for secret in secrets:
        row = []
        while len(row) < count:
            row += [s for s in random_secrets(rng, count - len(row), digits) if s != secret]
        rows.append(row)
    return np.array(rows)


def exposure(secret_loss: float, candidate_losses: np.ndarray, secret_space: int) -> dict[str, float]:
    """Exposure of one secret (Carlini et al. 2019, "The Secret Sharer", §4): log2 |R| - log2 rank.

    The rank of the secret among all |R| = ``secret_space`` secrets is estimated from c candidates
    drawn uniformly: ``sampled`` = log2((c + 1) / (1 + #candidates with a lower loss)), at most
    log2(c + 1); ``extrapolated`` (their §4.3) fits a skew-normal to the candidates' losses and takes
    -log2 of its CDF at the secret's loss, at most log2 |R|. A random secret scores about 1/ln 2.

    >>> exposure(0.0, np.array([1.0, 2.0, 3.0]), secret_space=10**6)["sampled"]
    2.0
    """
    candidate_losses = np.asarray(candidate_losses, dtype=np.float64)
    lower = int(np.sum(candidate_losses < secret_loss))
    sampled = math.log2((len(candidate_losses) + 1) / (1 + lower))
    if np.ptp(candidate_losses) > 0:
        params = scipy.stats.skewnorm.fit(candidate_losses)
        log_cdf = float(scipy.stats.skewnorm.logcdf(secret_loss, *params))
        extrapolated = min(max(-log_cdf / math.log(2), 0.0), math.log2(secret_space))
    else:
        extrapolated = sampled
    return {"sampled": sampled, "extrapolated": extrapolated}
