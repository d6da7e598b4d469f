"""Run configurations shipped with namedmask (`namedmask run --config <name>.yaml`)."""
