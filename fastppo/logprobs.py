"""Per-token log-probabilities and entropy (public functions). STUB: being written."""


def logprobs_and_entropy(*args, **kwargs):
    raise NotImplementedError


def linear_logprobs_and_entropy(*args, **kwargs):
    raise NotImplementedError
