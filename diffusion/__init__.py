"""Noise schedules, training losses, samplers, guidance and the UNet stage trainer."""
