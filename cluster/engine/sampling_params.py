"""Per-request sampling parameters, with OpenAI's semantics and ranges."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import ModelConfig

MAX_TOP_LOGPROBS = 20
MAX_CACHE_SALT_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI bounds it
MAX_STOP_TOKEN_IDS = 64  # vLLM sets no bound; a stop list longer than this is no stop list
LOGIT_BIAS_RANGE = 100.0  # each bias is in [-100, 100]
# Temperatures below this sample greedily: dividing fp32 logits by a smaller one overflows them to inf (and NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 1024  # 0: nothing is generated (the prompt alone is computed, and scored with prompt_logprobs)
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # never part of the returned text
    # Tokens that end the output (vLLM's): like EOS, the one sampled is not in the content but is counted
    stop_token_ids: tuple[int, ...] = ()
    # vLLM's: EOS and stop_token_ids cannot be sampled, and stop strings do not stop, before this many tokens
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by token id
    # An llguidance grammar (lark text, possibly with %json schemas) every choice's output must match; None: free.
    grammar: str | None = None
    # Requests share prefix-cache blocks only with requests of the same salt (vLLM's name). None: the shared,
    # unsalted cache. "" is refused rather than read as None, so a caller whose salt came out empty (a tenant id
    # never set) hears about it instead of silently joining the shared cache.
    cache_salt: str | None = None
    # Prompt scoring (the legacy completions' echo with logprobs): each prompt token's logprob given the tokens
    # before it, with this many top alternatives (0..MAX_TOP_LOGPROBS); the first token has none. None: not scored.
    # The request's first choice computes its whole prompt for it (no prefix-cache reuse: cached blocks have no
    # logits) and every choice reports the same scores.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS and all(t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} token ids, each >= 0"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS,
             f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}"),
            (all(-LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE for _, b in self.logit_bias),
             f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]"),
            (self.grammar is None or len(self.grammar) > 0, "grammar must not be empty (leave it out for none)"),
            (all(self.stop), "stop strings must not be empty"),
            (self.cache_salt is None or isinstance(self.cache_salt, str) and 0 < len(self.cache_salt) <=
             MAX_CACHE_SALT_CHARS, f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
             "characters (leave it out for no salt)"),  # the value is not echoed: it may be a secret
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the parameters it leaves out."""

    temperature: float
    # The hosted chat-completion pages this service mirrors default to 1024 (OpenAI's own API has no fixed
    # default); clipped to the context the prompt leaves
    max_tokens: int = 1024

    @classmethod
    def for_model(cls, config: ModelConfig) -> "SamplingDefaults":
        """The hosted pages' temperatures: 0.5 for the Mixtral MoE models, 0.3 for the dense Mistral 7B."""
        return cls(temperature=0.5 if config.is_moe else 0.3)
