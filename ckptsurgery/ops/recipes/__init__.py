"""mergekit recipes (the YAML `mergekit-yaml` reads), planned without an architecture file and
without reading tensor data:

    schema.py  load_recipe: the YAML read into frozen objects (Recipe, Slice, ModelRef, settings)
    values.py  a parameter's value for one tensor: scalars, gradients over the layers, filters,
               and their precedence (slice source > slice > recipe)
    layers.py  layer_scheme: which keys are which layer, from the key names (or --layer-pattern)
    plan.py    plan_recipe: per output tensor, the method, its sources and resolved parameters
    chat_templates.py  `chat_template:`: mergekit's named templates (ours, rendering the same) and `auto`

    from ckptsurgery.ops.recipes import load_recipe, plan_recipe
    recipe = load_recipe(Path("slerp.yml"))
    plan = plan_recipe(recipe, {model: {key: shape, ...} for model in recipe.referenced_models()})
"""

from .layers import LayerScheme, Template, check_layer_pattern, layer_scheme
from .plan import Planned, RecipePlan, Role, Source, plan_lines, plan_recipe, side
from .schema import (
    Conditional, Filtered, Gradient, ModelEntry, ModelRef, Recipe, Settings, Slice, SliceSource, TokenizerKind,
    TokenizerSource, load_recipe, refuse_unknown_parameters, setting_names, walk_settings,
)
from .values import evaluate, resolve

__all__ = ["Conditional", "Filtered", "Gradient", "LayerScheme", "ModelEntry", "ModelRef", "Planned", "Recipe",
           "RecipePlan", "Role", "Settings", "Slice", "SliceSource", "Source", "Template", "TokenizerKind",
           "TokenizerSource", "check_layer_pattern", "evaluate", "layer_scheme", "load_recipe", "plan_lines",
           "plan_recipe", "refuse_unknown_parameters", "resolve", "setting_names", "side", "walk_settings"]
