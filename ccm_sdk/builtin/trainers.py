"""Built-in trainers: DM's and CM's ControlNets, the unified adapter, LCD, DreamBooth, a VAE and a text-to-image UNet."""

from ..hookspecs import hookimpl


@hookimpl
def register_trainers(register):
    # imported inside the hook: the training stack loads only when the trainers are listed
    from ..training.adapter import AdapterTrainer
    from ..training.ct_controlnet import CTControlNetTrainer
    from ..training.dm_controlnet import DMControlNetTrainer
    from ..training.dreambooth import DreamBoothTrainer
    from ..training.lcd import LCDTrainer
    from ..training.t2i import T2ITrainer
    from ..training.vae import VAETrainer

    for trainer_cls in (DMControlNetTrainer, CTControlNetTrainer, AdapterTrainer, LCDTrainer, DreamBoothTrainer, VAETrainer, T2ITrainer):
        register(trainer_cls)
