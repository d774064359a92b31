"""PPO policy loss, value loss and KL penalties (public functions). STUB: being written."""


def policy_loss(*args, **kwargs):
    raise NotImplementedError


def value_loss(*args, **kwargs):
    raise NotImplementedError


def kl_penalty(*args, **kwargs):
    raise NotImplementedError
