#!/bin/bash
# Balsam pilot job: {{ job_name }}
#COBALT -n {{ num_nodes }}
#COBALT -t {{ wall_time_min }}
{% if queue %}
#COBALT -q {{ queue }}
{% endif %}
{% if project %}
#COBALT -A {{ project }}
{% endif %}
{% if sched_directives %}
{{ sched_directives }}
{% endif %}

cd "{{ workdir }}"
{{ env_exports }}
{% if preamble %}
{{ preamble }}
{% endif %}

{{ launcher_command }}
