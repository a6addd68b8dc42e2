"""Request-facing layer: admission (limits, params, validation), the bounded inference executor, routes."""
