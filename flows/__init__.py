"""Prefect flows and the medflow CLI."""
