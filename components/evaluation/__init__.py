"""medflow evaluation step."""
