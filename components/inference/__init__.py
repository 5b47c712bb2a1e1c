"""Load a trained model and predict with it: the one place every stage predicts through."""
