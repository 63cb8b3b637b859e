"""Secrets at rest: a model field whose stored form is a MultiFernet token.

Loaded values are SealedSecret objects: they print as a mask and decrypt only
when reveal() is called, so listing customers never needs the keys and a
secret cannot slip into a log line, a template or an exception by accident.
In the admin the field is write-only: an empty submission keeps the stored value.
"""

from __future__ import annotations

from functools import lru_cache

from django import forms
from django.apps import apps
from django.conf import settings
from django.db import models, transaction

from engines.secretbox import Secret, SecretBox


@lru_cache(maxsize=4)
def _box_for(keys: str) -> SecretBox:
    return SecretBox(keys)


def box() -> SecretBox:
    return _box_for(settings.KASA_SECRET_KEYS)


class SealedSecret(Secret):
    """A stored secret, decrypted lazily on reveal()."""

    __slots__ = ("token",)

    def __init__(self, token: str):
        super().__init__("")
        self.token = token

    def reveal(self) -> str:
        return box().decrypt(self.token).reveal()

    def __bool__(self) -> bool:
        return bool(self.token)

    def __eq__(self, other):
        if isinstance(other, SealedSecret):
            return self.token == other.token
        return NotImplemented

    def __hash__(self):
        return hash(self.token)


class SecretFormField(forms.CharField):
    widget = forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"})

    def __init__(self, **kwargs):
        kwargs["required"] = False
        kwargs.setdefault("strip", False)
        kwargs.setdefault("help_text", "Write-only: leave empty to keep the stored value.")
        super().__init__(**kwargs)

    def prepare_value(self, value):
        return ""  # never render the stored value, not even its token

    def has_changed(self, initial, data):
        return bool(data)


class EncryptedSecretField(models.TextField):
    description = "A secret encrypted at rest with KASA_SECRET_KEYS"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("blank", True)
        kwargs.setdefault("default", "")
        super().__init__(*args, **kwargs)

    def from_db_value(self, value, expression, connection):
        return SealedSecret(value) if value else ""

    def to_python(self, value):
        return value

    def get_prep_value(self, value):
        if value is None or value == "":
            return ""
        if isinstance(value, SealedSecret):
            return value.token
        if isinstance(value, Secret):
            return box().encrypt(value.reveal())
        return box().encrypt(str(value))

    def value_to_string(self, obj):
        # Serialisation (dumpdata) keeps the ciphertext, never the clear text.
        value = self.value_from_object(obj)
        return value.token if isinstance(value, SealedSecret) else ""

    def formfield(self, **kwargs):
        extra = {"help_text": self.help_text} if self.help_text else {}
        return SecretFormField(label=self.verbose_name.capitalize(), **extra)

    def save_form_data(self, instance, data):
        if data:  # empty means "keep what is stored"
            setattr(instance, self.name, data)


def reveal(value) -> str:
    """Clear text of a field value that may be '', a str or a Secret."""
    if isinstance(value, Secret):
        return value.reveal()
    return value or ""


def encrypted_fields():
    """(model, field) for every EncryptedSecretField in the project."""
    for model in apps.get_models():
        for field in model._meta.get_fields():
            if isinstance(field, EncryptedSecretField):
                yield model, field


def rotate_all() -> dict:
    """Re-encrypt every stored secret under the newest key. Returns counts per model."""
    b = box()
    counts = {}
    for model, field in encrypted_fields():
        rotated = 0
        with transaction.atomic():
            rows = model._base_manager.exclude(**{field.attname: ""}).select_for_update()
            for pk, value in rows.values_list("pk", field.attname):
                token = value.token if isinstance(value, SealedSecret) else value
                if not b.is_current(token):
                    # .update() with the raw token: no clear text ever lands in a Python str here.
                    model._base_manager.filter(pk=pk).update(**{field.attname: SealedSecret(b.rotate(token))})
                    rotated += 1
        counts[model._meta.label] = rotated
    return counts
