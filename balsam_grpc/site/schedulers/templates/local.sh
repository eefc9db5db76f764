#!/bin/bash
# Balsam pilot job on this host: {{ job_name }} ({{ num_nodes }} node(s), {{ wall_time_min }} min)
cd "{{ workdir }}"
{{ env_exports }}
{% if preamble %}
{{ preamble }}
{% endif %}

{{ launcher_command }}
