"""Forms shared by the pages that change a customer."""

from __future__ import annotations

from django import forms


class ConfirmForm(forms.Form):
    """The typed confirmation of a destructive operation (restore, upgrade, rollback): the customer's domain,
    exactly (case aside)."""

    confirm = forms.CharField(label="Type the customer's domain to confirm", required=True,
                              widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))

    def __init__(self, *args, customer, **kwargs):
        super().__init__(*args, **kwargs)
        self.customer = customer

    def clean_confirm(self):
        typed = self.cleaned_data["confirm"].strip().lower()
        if typed != self.customer.domain:
            raise forms.ValidationError(f"type {self.customer.domain} exactly to confirm")
        return typed
