"""Credentials do not belong in a run config: it is copied into the run directory and the launch scripts.

A variable's name says little (`MY_SETTING` can hold a token), so the values are looked at: tokens with
the prefixes credential issuers use, and long random-looking strings (high entropy per character, like
API keys and hex tokens). The check names the field, never the value.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

# Prefixes of tokens issued by common services (Hugging Face, GitHub, GitLab, OpenAI/Anthropic-style keys,
# Slack, AWS access keys, Google API keys and OAuth tokens, npm, PyPI, DigitalOcean, SendGrid, Stripe).
KNOWN_PREFIXES = ("hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "sk-", "sk_live_",
                  "rk_live_", "xoxb-", "xoxp-", "xoxa-", "xoxs-", "AKIA", "ASIA", "AIza", "ya29.", "npm_", "pypi-",
                  "dop_v1_", "SG.")
NAME_WORDS = ("API_KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE_KEY", "AUTH")
MIN_RANDOM_LENGTH = 32  # shorter random strings (run ids, short hashes) are common in settings
MIN_BITS_PER_CHAR = 3.5  # English words and paths stay well below; hex keys reach ~3.9, base64 keys ~5


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[\s=:,;'\"`()\[\]{}<>@/\\]+", text) if t]


def credential_reason(text: str) -> Optional[str]:
    """Why a value looks like a credential (without repeating it), or None."""
    for token in _tokens(text):
        prefix = next((p for p in KNOWN_PREFIXES if token.startswith(p)), None)
        if prefix and len(token) >= len(prefix) + 12:
            return f"it contains a token starting with {prefix!r}, the form of an issued credential"
        if (len(token) >= MIN_RANDOM_LENGTH and re.fullmatch(r"[A-Za-z0-9+_.\-]+", token)
                and _entropy(token) >= MIN_BITS_PER_CHAR and re.search(r"\d", token)):
            return f"it contains a {len(token)}-character random-looking string, the form of an API key or token"
    return None


def secret_problems(env: dict[str, str], lines: dict[str, str]) -> list[str]:
    """Problems with credential-like names or values in launch.env, and values in other shell lines."""
    where = ("secrets are not allowed in the config (it is copied into the run directory and the launch scripts); "
             "export it in the environment that runs shardtune or the job instead")
    problems = []
    for key, value in env.items():
        if any(word in key.upper() for word in NAME_WORDS):
            problems.append(f"launch.env.{key}: the name says it holds a secret; {where}")
        elif reason := credential_reason(value):
            problems.append(f"launch.env.{key}: the value looks like a credential ({reason}); {where}")
    for field, line in lines.items():
        if reason := credential_reason(line):
            problems.append(f"{field}: the line looks like it holds a credential ({reason}); {where}")
    return problems
