"""What other apps add to the customer's admin page: cards, pages under the customer's URL, changelist actions.

customers sits below backups and upgrades and never imports them. Each of them registers here, in its
AppConfig.ready() (as they register their run kinds with operations.registry), dotted paths that this registry
imports only when a page asks:

- a **card** `fn(request, customer) -> dict`: context for the customer's change page (its template shows it);
- a **page** `view(request, pk, model_admin)` at `<pk>/<route>/`, named `admin:customers_customer_<route>`;
- an **action** `fn(model_admin, request, queryset)` on the customers changelist, offered to holders of
  `permission` (a core.permissions name); its name is the function's, its label its `short_description`.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils.module_loading import import_string


@dataclass(frozen=True)
class Page:
    route: str
    view: str


@dataclass(frozen=True)
class Action:
    function: str
    permission: str


_cards: list[str] = []
_pages: list[Page] = []
_actions: list[Action] = []


def register_card(function: str) -> None:
    if function not in _cards:
        _cards.append(function)


def register_page(route: str, view: str) -> None:
    if all(p.route != route for p in _pages):
        _pages.append(Page(route, view))


def register_action(function: str, *, permission: str) -> None:
    if all(a.function != function for a in _actions):
        _actions.append(Action(function, permission))


def cards() -> list:
    return [import_string(c) for c in _cards]


def pages() -> list[Page]:
    return list(_pages)


def actions() -> list[Action]:
    return list(_actions)


def card_context(request, customer) -> dict:
    """Every registered card's context for one customer page, in registration order."""
    context: dict = {}
    for card in cards():
        context.update(card(request, customer))
    return context
