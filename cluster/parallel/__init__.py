"""Expert parallelism: which shard holds which experts, and how routed tokens reach them."""
