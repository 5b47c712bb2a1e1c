"""The champion on new studies: batch prediction with lineage, and drift against its training data."""
