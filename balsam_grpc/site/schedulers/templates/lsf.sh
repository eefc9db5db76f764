#!/bin/bash
# Balsam pilot job: {{ job_name }}
#BSUB -J {{ job_name }}
#BSUB -nnodes {{ num_nodes }}
#BSUB -W {{ wall_time_min }}
{% if queue %}
#BSUB -q {{ queue }}
{% endif %}
{% if project %}
#BSUB -P {{ project }}
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
