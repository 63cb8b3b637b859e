"""Kasa's composition layer: the pages and figures that span apps (fleet overview, the customer page's
cards, metrics, setup). It imports the other apps; none of them imports it."""
