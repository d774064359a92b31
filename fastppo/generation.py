"""Rollout generation. STUB: being written."""


class Generator:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
