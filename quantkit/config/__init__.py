"""Configuration as typed, validated, versioned data: the scheme of each linear (its parts: rotation, method,
quantizer, format) and recipes that assign schemes to layers. Names resolve in the registries of
``quantkit.registry`` when a config is validated; nothing here imports the implementations."""

from __future__ import annotations

from quantkit.config.recipe import Recipe, SchemeRule, list_presets, load_recipe, matches, save_recipe
from quantkit.config.scheme import LayerScheme, MethodSpec, RotationKind, RotationSpec
from quantkit.config.spec import FieldError, Spec

__all__ = ["FieldError", "LayerScheme", "MethodSpec", "Recipe", "RotationKind", "RotationSpec", "SchemeRule", "Spec",
           "list_presets", "load_recipe", "matches", "save_recipe"]
