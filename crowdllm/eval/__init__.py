"""Evaluation: metrics, cost, reports and plots, the aggregator benchmark."""
