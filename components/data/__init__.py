"""medflow data step."""
