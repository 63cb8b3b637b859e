"""Admin pages of rollouts: "Roll out…" (from a release's page, or the action on selected customers), the
rollout's own page (live, with its controls) and the control POSTs. Every change goes through rollouts.services.

Team-scoped like every customer page: a rollout that includes a customer of another team is a 404 (never a 403
that would confirm it exists); planning names only the requester's customers (rollouts.planning.plan with
user=). Within the team: starting needs rollouts.add_rollout, the controls rollouts.control_rollout, else 403.
Starting is preview first, then the release's name typed in full; the controls are POST-only.
"""

from __future__ import annotations

import hashlib
import json

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse

from core import permissions
from core.admin_mixins import admin_page
from customers.models import Team
from engines import rolloutplan
from releases.models import Release

from . import planning, services
from .models import Rollout
from .pageview import CONTROLS, page_document, render_live

REFUSED = (rolloutplan.PlanError, services.RolloutError, PermissionDenied)
OPS = [(op, op) for op in ("<", "<=", ">", ">=", "==", "!=")]


class RolloutForm(forms.Form):
    release = forms.ModelChoiceField(Release.objects.order_by("-created_at"), to_field_name="name",
                                     empty_label="— choose —")
    team = forms.ChoiceField(required=False, help_text="Only this team's customers.")
    tags = forms.CharField(required=False, help_text="Comma-separated: a customer must carry every tag given.")
    domains = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
                              help_text="Only these customers (one per line, or separated by commas).")
    from_version = forms.CharField(required=False, label="From version",
                                   help_text="Only customers currently on this release (or version).")
    waves = forms.CharField(initial="10,25,50,100", help_text="Cumulative percentages of the selection.")
    bakes = forms.CharField(initial="30m,1h,2h", label="Bakes", help_text="Watching time after each wave "
                            "(s, m, h, d; the last repeats; 0 for none).")
    concurrency = forms.IntegerField(initial=2, min_value=1, max_value=50, help_text="Upgrades at once in a wave.")
    max_failures = forms.IntegerField(initial=0, min_value=0, max_value=1000, label="Max failures",
                                      help_text="Failed upgrades a wave may have.")
    on_failure = forms.ChoiceField(choices=Rollout.OnFailure.choices, initial=Rollout.OnFailure.HALT,
                                   label="On failure")
    strategy = forms.ChoiceField(choices=Rollout.Strategy.choices, initial=Rollout.Strategy.IN_PLACE, required=False,
                                 help_text="Blue-green: each new release answers beside the live one first.")
    health_gate = forms.BooleanField(required=False, initial=True, label="Health gate",
                                     help_text="Every upgraded customer's health URLs must answer.")
    prom_query = forms.CharField(required=False, label="Prometheus query",
                                 help_text="Optional PromQL; $customers matches the upgraded customers' domains.")
    prom_op = forms.ChoiceField(choices=OPS, initial="<", required=False, label="Comparison")
    prom_threshold = forms.FloatField(required=False, label="Threshold")
    window = forms.CharField(required=False, help_text="A daily maintenance window, HH:MM-HH:MM (empty: any time).")
    window_zone = forms.CharField(initial="UTC", required=False, label="Window time zone")
    confirm = forms.CharField(required=False, label="Type the release's name to confirm",
                              widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))
    digest = forms.CharField(required=False, widget=forms.HiddenInput)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        teams = Team.objects.all() if user.is_superuser else Team.objects.filter(members=user)
        self.fields["team"].choices = [("", "— any —")] + [(t.name, t.name) for t in teams.order_by("name")]

    def clean(self):
        data = super().clean()
        if data.get("prom_query") and data.get("prom_threshold") is None:
            self.add_error("prom_threshold", "a Prometheus gate needs a threshold")
        return data

    def domain_list(self) -> list[str]:
        text = self.cleaned_data.get("domains") or ""
        return [d.strip() for d in text.replace(",", "\n").splitlines() if d.strip()]

    def tag_list(self) -> list[str]:
        return [t.strip() for t in (self.cleaned_data.get("tags") or "").split(",") if t.strip()]

    def prometheus(self) -> dict | None:
        d = self.cleaned_data
        if not d.get("prom_query"):
            return None
        return {"query": d["prom_query"], "op": d.get("prom_op") or "<", "threshold": d["prom_threshold"]}


def _plan(form: RolloutForm, user) -> planning.Plan:
    d = form.cleaned_data
    return planning.plan(d["release"], user=user, team=d.get("team") or "", tags=form.tag_list(),
                         domains=form.domain_list(), from_version=(d.get("from_version") or "").strip(),
                         percents=d["waves"], bakes=d["bakes"])


def _digest(plan: planning.Plan, form: RolloutForm) -> str:
    """What the confirmation was given for: the plan and every setting. A change since the preview asks again."""
    settings_ = {k: v for k, v in form.cleaned_data.items() if k not in ("confirm", "digest", "release")}
    text = json.dumps([plan.document(), settings_], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plan_context(plan: planning.Plan) -> dict:
    return {"waves": [{"position": i + 1, "percent": plan.percents[i], "bake": plan.bakes[i],
                       "customers": wave} for i, wave in enumerate(plan.waves)],
            "skipped": plan.skipped, "members": len(plan.members)}


def start_view(request, model_admin, *, initial: dict | None = None, action_post: bool = False):
    """GET (or the customers action): the form. POST _preview: the plan, and the confirmation. POST _confirm:
    plan again; when it is still what was previewed and the release's name is typed, start the rollout."""
    permissions.require(request.user, permissions.ROLLOUT)
    posted = request.method == "POST" and not action_post
    form = RolloutForm(request.POST if posted else None, user=request.user, initial=initial or {
        "release": request.GET.get("release", ""), "domains": request.GET.get("domains", "")})
    plan = None
    problems: list[str] = []
    confirming = posted and "_confirm" in request.POST
    if posted and form.is_valid():
        try:
            plan = _plan(form, request.user)
        except REFUSED as exc:
            problems.append(str(exc))
        else:
            digest = _digest(plan, form)
            release = form.cleaned_data["release"]
            typed_wrong = changed = ""
            if confirming and form.cleaned_data.get("digest") != digest:
                changed = ("the plan or a setting changed since the preview: look at it again, then confirm; "
                           "nothing was started")
            elif confirming and (form.cleaned_data.get("confirm") or "").strip() != release.name:
                typed_wrong = f"type {release.name} exactly to confirm; nothing was started"
            elif confirming:
                d = form.cleaned_data
                try:
                    rollout = services.rollout_create(
                        plan, requested_by=request.user, via="admin", concurrency=d["concurrency"],
                        max_failures=d["max_failures"], on_failure=d["on_failure"], health_gate=d["health_gate"],
                        prometheus=form.prometheus(), window=(d.get("window") or "").strip(),
                        window_zone=(d.get("window_zone") or "UTC").strip(),
                        strategy=d.get("strategy") or Rollout.Strategy.IN_PLACE)
                except REFUSED as exc:
                    problems.append(str(exc))
                else:
                    messages.success(request, f"Rollout #{rollout.pk} of {release.name} to {len(plan.members)} "
                                              "customer(s) scheduled: the workers start it at once.")
                    return redirect(reverse("admin:rollouts_rollout_change", args=[rollout.pk]))
            # The preview (again): the same settings, the plan's digest, the confirmation to type.
            data = request.POST.copy()
            data["digest"], data["confirm"] = digest, ""
            form = RolloutForm(data, user=request.user)
            form.is_valid()
            if typed_wrong:
                form.add_error("confirm", typed_wrong)
            if changed:
                form.add_error(None, changed)
    status = 400 if posted and (problems or form.errors) else 200
    return admin_page(request, model_admin, "admin/rollouts/rollout/start.html", title="Roll out a release",
                      status=status, form=form, plan=_plan_context(plan) if plan and not problems else None,
                      problems=problems)


@admin.action(description="Roll out a release to the selected customers…")
def rollout_action(model_admin, request, queryset):
    """The customers changelist's action: the "Roll out…" page with the selected customers' domains filled in."""
    rollout_admin = model_admin.admin_site._registry[Rollout]
    domains = "\n".join(queryset.order_by("domain").values_list("domain", flat=True))
    return start_view(request, rollout_admin, initial={"domains": domains}, action_post=True)


def _rollout(request, pk, model_admin) -> Rollout:
    try:
        pk = int(pk)
    except (TypeError, ValueError):
        raise Http404 from None
    # Team-scoped: a rollout with a customer of another team is missing (404), whatever the permissions.
    return get_object_or_404(model_admin.get_queryset(request).select_related("release", "requested_by"), pk=pk)


def rollout_view(request, pk, model_admin):
    """The rollout: status and reason, the waves as a timeline with their customers and gates, skipped
    customers, the controls; followed live over the WebSocket (rollouts.consumers)."""
    rollout = _rollout(request, pk, model_admin)
    if not model_admin.has_view_permission(request, rollout):
        raise PermissionDenied
    doc = page_document(rollout)
    may_control = permissions.has(request.user, permissions.ROLLOUT_CONTROL)
    return admin_page(request, model_admin, "admin/rollouts/rollout/page.html", title=f"Rollout #{rollout.pk} of "
                      f"{rollout.release.name}", obj=rollout, d=doc, live_html=render_live(doc),
                      may_control=may_control, controls=CONTROLS,
                      promote_all_words=services.PROMOTE_ALL_CONFIRMATION)


ACTIONS = {"pause": services.rollout_pause, "resume": services.rollout_resume, "promote": services.rollout_promote,
           "retry": services.rollout_retry}
DONE = {"pause": "paused (upgrades running finish first)", "resume": "resumed", "promote": "promoted",
        "promote_all": "promoted: every remaining bake and gate is skipped", "abort": "aborted", "retry": "retried"}


def control_view(request, pk, action: str, model_admin):
    """POST: one control of the rollout, through its service function; back to the rollout's page."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    rollout = _rollout(request, pk, model_admin)
    if action not in CONTROLS:
        raise Http404
    permissions.require(request.user, permissions.ROLLOUT_CONTROL)
    try:
        if action == "promote_all":
            services.rollout_promote_all(rollout, actor=request.user, via="admin",
                                         confirmation=request.POST.get("confirm", ""))
        elif action == "abort":
            services.rollout_abort(rollout, actor=request.user, via="admin",
                                   revert=request.POST.get("revert") in ("1", "on", "true"))
        else:
            ACTIONS[action](rollout, actor=request.user, via="admin")
    except services.RolloutError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Rollout #{rollout.pk} {DONE[action]}.")
    return redirect(reverse("admin:rollouts_rollout_change", args=[rollout.pk]))
