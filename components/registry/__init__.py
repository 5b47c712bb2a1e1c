"""medflow registry step."""
