"""Library for logit-free feature knowledge distillation: data, models, training, metrics.

Nothing here parses arguments or decides paths; the commands in `stages/` do.
"""

__version__ = "0.1.0"
