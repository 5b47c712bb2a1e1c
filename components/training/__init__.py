"""medflow training step."""
