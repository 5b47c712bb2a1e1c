"""medflow validation step."""
