"""The plugin hooks: one ``register_*(register)`` hook per kind of extension.

A plugin implements any of them with ``@ccm_sdk.hookimpl`` and calls ``register(obj)`` (or
``register(obj, name="...")``) once per thing it provides; without ``name`` the object's ``name``
attribute is used. Built-in implementations use the very same hooks.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("ccm_sdk")
hookimpl = HookimplMarker("ccm_sdk")


@hookspec
def register_conditions(register):
    """Register Condition subclasses: ``register(ConditionClass)``."""


@hookspec
def register_controlnets(register):
    """Register ControlNet providers: ``register(provider, name=...)``, provider(source, **kw) -> ControlNetModel."""


@hookspec
def register_adapters(register):
    """Register Adapter classes: ``register(AdapterClass)``."""


@hookspec
def register_samplers(register):
    """Register Sampler subclasses: ``register(SamplerClass)``; each picks its timesteps and runs a pure
    sampler function of the shared signature (ccm_sdk.sampling) over them."""


@hookspec
def register_datasets(register):
    """Register dataset factories: ``register(factory, name=...)``, factory(**options) -> torch Dataset."""


@hookspec
def register_models(register):
    """Register pretrained-model resolvers: ``register(resolver, name=...)``, resolver(argument) -> local folder."""


@hookspec
def register_trainers(register):
    """Register Trainer subclasses: ``register(TrainerClass)``; the class's ``name`` selects it, its ``config_class`` is what it reads."""


@hookspec
def register_feature_extractors(register):
    """Register FID feature-extractor factories: ``register(factory, name=...)``, factory(config, *, device) -> FeatureExtractor."""
