"""Forms shared by the pages that change a customer."""

from __future__ import annotations

import json

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


class LinesField(forms.Field):
    """A list or mapping edited as lines of text (a textarea), kept as JSON in the model field. Blank lines and
    spaces at either end of a line are dropped. A JSON value pasted whole (what the field held before) is taken
    as it is. The model field's validators (customers.validators) judge the result, for the admin as for the CLI."""

    json_type: type = list

    def __init__(self, *, encoder=None, decoder=None, **kwargs):  # what models.JSONField passes
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": 3, "class": "kasa-lines", "spellcheck": "false",
                                                          "autocomplete": "off"}))
        super().__init__(**kwargs)

    def from_lines(self, lines: list[str]):
        raise NotImplementedError

    def to_lines(self, value) -> list[str]:
        raise NotImplementedError

    def to_python(self, value):
        if value is None or isinstance(value, self.json_type):
            return value if value is not None else self.json_type()
        text = str(value).strip()
        if text[:1] in "[{" and text:
            try:
                loaded = json.loads(text)
            except ValueError:
                loaded = None
            if isinstance(loaded, self.json_type):
                return loaded
        return self.from_lines([line.strip() for line in text.splitlines() if line.strip()])

    def prepare_value(self, value):
        if isinstance(value, str):  # bound data shown again (a form with errors)
            return value
        lines = self.to_lines(value or self.json_type())
        if isinstance(self.widget, forms.Textarea):
            self.widget.attrs["rows"] = max(2, min(12, len(lines) + 1))
        return "\n".join(lines)

    def has_changed(self, initial, data):
        try:
            return self.to_python(data) != (initial if initial is not None else self.json_type())
        except forms.ValidationError:
            return True


class ArgvField(LinesField):
    """A start/stop command: one argument per line (an argv list, never a shell string)."""

    json_type = list

    def from_lines(self, lines):
        return lines

    def to_lines(self, value):
        return [str(a) for a in value] if isinstance(value, list) else [json.dumps(value)]


class VersionsField(LinesField):
    """The recorded versions: one COMPONENT=VERSION per line, as customer_add's --version."""

    json_type = dict

    def from_lines(self, lines):
        versions = {}
        for line in lines:
            component, sep, version = line.partition("=")
            if not sep:
                raise forms.ValidationError(f"{line!r}: write COMPONENT=VERSION, one per line", code="versions")
            versions[component.strip()] = version.strip()
        return versions

    def to_lines(self, value):
        return [f"{k}={v}" for k, v in sorted(value.items())] if isinstance(value, dict) else [json.dumps(value)]
