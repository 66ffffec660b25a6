#!/usr/bin/env ruby
# Renders every case of tests/liquid/cases.yaml with Ruby Liquid (Debian: apt-get install ruby
# ruby-liquid) and writes tests/liquid/expected.json: {"liquid_version", "cases": {name: output}}.
# A case Ruby refuses records {"error": message} instead of a string. Run it again after
# editing cases.yaml; `make test` only reads the committed expected.json.
require "json"
require "yaml"
require "liquid"

dir = File.dirname(__FILE__)
spec = YAML.safe_load(File.read(File.join(dir, "cases.yaml")))
out = {}
spec.fetch("cases").each do |c|
  event = c.fetch("event", spec.fetch("default_event"))
  begin
    template = Liquid::Template.parse(c.fetch("template"), error_mode: :strict)
    out[c.fetch("name")] = template.render!({ "event" => event }, strict_filters: true)
  rescue Liquid::Error => e
    out[c.fetch("name")] = { "error" => e.message }
  end
end
File.write(File.join(dir, "expected.json"),
           JSON.pretty_generate({ "liquid_version" => Liquid::VERSION, "cases" => out }) + "\n")
puts "#{out.size} cases, Liquid #{Liquid::VERSION}"
