#!/bin/bash
# Balsam pilot job: {{ job_name }}
#PBS -N {{ job_name }}
#PBS -l select={{ num_nodes }}{{ select_suffix }}
#PBS -l walltime={{ wall_time_hms }}
{% if queue %}
#PBS -q {{ queue }}
{% endif %}
{% if project %}
#PBS -A {{ project }}
{% endif %}
#PBS -l place=scatter
{% if sched_directives %}
{{ sched_directives }}
{% endif %}

cd "{{ workdir }}"
{{ env_exports }}
{% if preamble %}
{{ preamble }}
{% endif %}

{{ launcher_command }}
