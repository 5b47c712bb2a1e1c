"""medflow's pipeline steps as plain Python: data, validation, training, evaluation, registry."""
