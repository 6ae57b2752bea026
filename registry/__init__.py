"""The clinical registry: patients, procedures, fractures, therapy, alerts, audit."""
