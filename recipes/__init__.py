"""Preset recipes (YAML), shipped as package data of ``quantkit.recipes``."""
