"""verl 0.9 adapters: thin glue from verl's engine/worker/trainer split to `verl_prefix.core`."""
