"""Court orders recorded as the ``court-order`` ground: who may record them, see them, and rely on them."""
