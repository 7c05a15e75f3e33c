"""Alerts on the live geometry, split as Alertmanager splits its own:

    state.py         AlertState, hysteresis in checks, ids, fingerprints, RFC 3339 times
    rules.py         each rule one unit (settings, evaluate, describe) in one registry
    config.py        AlertConfig: load and validate the settings
    delivery.py      the retrying POSTer and the Alertmanager webhook payload (version "4")
    alertmanager.py  alerts posted to Alertmanager's /api/v2/alerts, as Prometheus does
    engine.py        AlertEngine (rules on every check and on a timer, persisted), AlertService

A module imports only those above it in this list (engine.py composes the deliveries); no module imports this
package's ``__init__``.
"""
