"""Integrations: PEFT (``patch_peft``) and the Hugging Face ``Trainer`` (``AdaLoraCallback``)."""
